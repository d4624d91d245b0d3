{{- define "pec-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "pec-operator.serviceAccountName" -}}
{{- default (include "pec-operator.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "pec-operator.selectorLabels" -}}
app.kubernetes.io/name: pec-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "pec-operator.labels" -}}
{{ include "pec-operator.selectorLabels" . }}
app.kubernetes.io/component: operator
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The operator image: [registry/]repository, then @digest or :tag. */}}
{{- define "pec-operator.image" -}}
{{- $repo := .Values.image.repository -}}
{{- with .Values.image.registry }}{{ $repo = printf "%s/%s" . $repo }}{{ end -}}
{{- if .Values.image.digest -}}
{{ $repo }}@{{ .Values.image.digest }}
{{- else -}}
{{ $repo }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end -}}
