//! What a gateway pod needs besides its Deployment's shape: its
//! `gateway.yaml` (the schema is `pec_core::config`, shared with the
//! gateway) and the volumes behind every path that file names.
//!
//! Pure: functions of the MailDomain, its site, its SigningKey's active
//! generation and the operator-wide [`GatewayDefaults`].

use k8s_openapi::api::core::v1::{
    ConfigMapProjection, ConfigMapVolumeSource, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    KeyToPath, ObjectFieldSelector, PersistentVolumeClaimVolumeSource, ProjectedVolumeSource,
    SecretVolumeSource, Volume, VolumeMount, VolumeProjection,
};
use kube::ResourceExt;
use pec_core::config::{
    AntivirusConfig, GatewayConfig, HsmConfig, ListenConfig, PathsConfig, Profile as GwProfile,
    RelayConfig, SigningConfig, SmtpLimits, TlsConfig,
};

use crate::{
    api::{MailDomain, Profile, SecretKeyRef, SigningKey},
    controllers::names::PLATFORM_PROVIDERS,
};

/// Where the gateway configuration is mounted.
pub const CONFIG_DIR: &str = "/etc/pec-gateway";
/// The port of `/healthz`, `/readyz` and `/metrics`.
pub const METRICS_PORT: i32 = 8080;
const DATA_DIR: &str = "/var/lib/pec";
const TOKEN_DIR: &str = "/var/lib/softhsm/tokens";
const ROUTES_DIR: &str = "/etc/pec/routes";
const SOFTHSM_CONF_KEY: &str = "softhsm2.conf";

/// Operator-wide settings of every gateway (the operator's flags).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayDefaults {
    /// The image when a MailDomain names none.
    pub image: String,
    /// The PKCS#11 module inside the gateway image.
    pub pkcs11_module: String,
    /// A PersistentVolumeClaim holding SoftHSM2's token directory, shared
    /// with the operator; `None` when the module needs no local store (a
    /// network HSM client configured inside the image).
    pub token_claim: Option<String>,
    /// The platform's clamd, for MailDomains that name none.
    pub clamd: String,
    /// Secrets (by name, in each MailDomain's namespace) every gateway pod
    /// pulls its image with.
    pub image_pull_secrets: Vec<String>,
}

/// Where the gateways find clamd when neither the MailDomain nor the
/// operator's flags say: a clamd beside the gateway.
pub const DEFAULT_CLAMD: &str = "tcp:127.0.0.1:3310";

impl Default for GatewayDefaults {
    fn default() -> Self {
        Self {
            image: format!("pec/pec-gateway:{}", env!("CARGO_PKG_VERSION")),
            pkcs11_module: "/usr/lib/softhsm/libsofthsm2.so".into(),
            token_claim: None,
            clamd: DEFAULT_CLAMD.into(),
            image_pull_secrets: Vec::new(),
        }
    }
}

/// The active generation of the domain's SigningKey, as the gateway pods
/// use it: what `gateway.yaml` says, and which Secrets hold the PIN and the
/// published certificates.
#[derive(Debug, Clone, PartialEq)]
pub struct GatewaySigning {
    /// The `signing` section of `gateway.yaml`.
    pub config: SigningConfig,
    /// The PIN Secret and key.
    pub pin: SecretKeyRef,
    /// The ConfigMap listing the key's published certificates.
    pub index_config_map: String,
}

impl GatewaySigning {
    /// The active generation of `sk`, if it has one.
    pub fn of(sk: &SigningKey) -> Option<Self> {
        use crate::controllers::names;
        let current = sk.status.as_ref()?.current.as_ref()?;
        Some(Self {
            config: SigningConfig {
                key: sk.name_any(),
                token_label: sk.spec.hsm.token_label.clone(),
                key_id: current.key_id.clone(),
                generation: current.generation,
                certificate_secret: names::certificates_secret_name(&sk.name_any()),
                certificate_key: names::certificate_key(current.generation),
                certificate_sha256: current.fingerprint.clone().unwrap_or_default(),
            },
            pin: sk.spec.hsm.pin_secret_ref.clone(),
            index_config_map: names::index_name_of(&sk.name_any()),
        })
    }
}

/// The gateway configuration of `md` in `site`, with the paths where
/// [`volumes`] mounts things.
pub fn gateway_config(
    md: &MailDomain,
    site: &str,
    signing: Option<&GatewaySigning>,
    defaults: &GatewayDefaults,
) -> GatewayConfig {
    let spec = &md.spec;
    GatewayConfig {
        domain: spec.domain.clone(),
        profile: match spec.profile {
            Profile::Standard => GwProfile::Standard,
            Profile::ReceiveOnly => GwProfile::ReceiveOnly,
        },
        site: site.to_string(),
        max_message_bytes: spec.max_message_bytes,
        max_recipients: 100,
        antivirus: AntivirusConfig {
            enabled: true,
            infected_action: "RefuseNotifySenderQuarantine".into(),
            quarantine_retention: spec.antivirus.quarantine_retention.clone(),
            clamd: spec
                .antivirus
                .clamd
                .clone()
                .unwrap_or_else(|| defaults.clamd.clone()),
        },
        protocols: spec
            .profile
            .ports()
            .iter()
            .map(|p| p.name.to_string())
            .collect(),
        signing_key_ref: spec.signing_key_ref.clone(),
        signing: signing.map(|s| s.config.clone()),
        hsm: HsmConfig {
            module: defaults.pkcs11_module.clone().into(),
            pin_file: "/etc/pec/hsm/pin".into(),
        },
        listen: ListenConfig {
            http: format!("0.0.0.0:{METRICS_PORT}"),
            ..ListenConfig::default()
        },
        paths: PathsConfig {
            mailboxes: format!("{DATA_DIR}/mailboxes").into(),
            queue: format!("{DATA_DIR}/queue").into(),
            quarantine: format!("{DATA_DIR}/quarantine").into(),
            log: format!("{DATA_DIR}/log").into(),
            certificates: "/etc/pec/certificates".into(),
            providers: vec!["/etc/pec/providers".into()],
            credentials: "/etc/pec/credentials/mailboxes".into(),
        },
        tls: spec.gateway.tls_secret_ref.as_ref().map(|_| TlsConfig {
            cert_file: "/etc/pec/tls/tls.crt".into(),
            key_file: "/etc/pec/tls/tls.key".into(),
        }),
        relay: RelayConfig {
            routes: spec.gateway.relay.routes.clone(),
            routes_file: Some(format!("{ROUTES_DIR}/{}", super::routes::ROUTES_KEY).into()),
            smarthost: spec.gateway.relay.smarthost.clone(),
            ..RelayConfig::default()
        },
        smtp: SmtpLimits::default(),
    }
}

/// The SoftHSM2 configuration the gateways read, when the token store is
/// a shared volume.
pub fn softhsm_conf(defaults: &GatewayDefaults) -> Option<(String, String)> {
    defaults.token_claim.as_ref().map(|_| {
        (
            SOFTHSM_CONF_KEY.to_string(),
            format!("directories.tokendir = {TOKEN_DIR}\nobjectstore.backend = file\nlog.level = ERROR\n"),
        )
    })
}

/// The pod's volumes, the container's mounts and environment for
/// everything `gateway.yaml` names. `config_map` is the site's ConfigMap.
pub fn volumes(
    md: &MailDomain,
    signing: Option<&GatewaySigning>,
    defaults: &GatewayDefaults,
    config_map: &str,
) -> (Vec<Volume>, Vec<VolumeMount>, Vec<EnvVar>) {
    let mut volumes = vec![
        Volume {
            name: "config".into(),
            config_map: Some(k8s_openapi::api::core::v1::ConfigMapVolumeSource {
                name: config_map.to_string(),
                ..Default::default()
            }),
            ..Volume::default()
        },
        Volume {
            name: "tmp".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
    ];
    let mut mounts = vec![
        mount("config", CONFIG_DIR, true),
        mount("tmp", "/tmp", false),
    ];
    let mut env = vec![
        EnvVar {
            name: "PEC_GATEWAY_CONFIG".into(),
            value: Some(format!("{CONFIG_DIR}/{}", pec_core::config::FILE_NAME)),
            ..EnvVar::default()
        },
        EnvVar {
            name: "POD_NAME".into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "metadata.name".into(),
                    ..ObjectFieldSelector::default()
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        },
    ];
    // Queue, quarantine and legal log: each pod under its own name on the
    // shared claim, so replicas never write each other's queue. Mailboxes:
    // one tree for the whole domain (Maildir takes concurrent deliveries),
    // so a mailbox owner reads the same mail through whichever pod answers.
    let data = match &md.spec.gateway.storage_claim_name {
        Some(claim) => Volume {
            name: "data".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim.clone(),
                ..PersistentVolumeClaimVolumeSource::default()
            }),
            ..Volume::default()
        },
        None => Volume {
            name: "data".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
    };
    volumes.push(data);
    mounts.push(VolumeMount {
        sub_path_expr: md
            .spec
            .gateway
            .storage_claim_name
            .as_ref()
            .map(|_| "$(POD_NAME)".to_string()),
        ..mount("data", DATA_DIR, false)
    });
    if md.spec.gateway.storage_claim_name.is_some() {
        mounts.push(VolumeMount {
            sub_path: Some("mailboxes".into()),
            ..mount("data", &format!("{DATA_DIR}/mailboxes"), false)
        });
    }
    if let Some(s) = signing {
        volumes.push(secret_volume(
            "hsm-pin",
            &s.pin.name,
            Some((&s.pin.key, "pin")),
        ));
        mounts.push(mount("hsm-pin", "/etc/pec/hsm", true));
        volumes.push(secret_volume(
            "certificates",
            &s.config.certificate_secret,
            None,
        ));
        mounts.push(mount("certificates", "/etc/pec/certificates", true));
    }
    // Trusted: the domain's own index, every key of the platform in this
    // namespace (one aggregate the operator keeps current; a volume, so a
    // new key is trusted without rolling the pods), and the listed providers.
    let mut sources: Vec<VolumeProjection> = signing
        .map(|s| s.index_config_map.clone())
        .into_iter()
        .chain([PLATFORM_PROVIDERS.to_string()])
        .chain(md.spec.gateway.providers.iter().cloned())
        .map(|name| VolumeProjection {
            config_map: Some(ConfigMapProjection {
                items: Some(vec![KeyToPath {
                    key: "bundle.crt".into(),
                    path: format!("{name}.crt"),
                    ..KeyToPath::default()
                }]),
                name: name.clone(),
                // A provider ConfigMap not there yet must not keep the pod down.
                optional: Some(true),
            }),
            ..VolumeProjection::default()
        })
        .collect();
    if !sources.is_empty() {
        sources.sort_by(|a, b| {
            let name = |p: &VolumeProjection| p.config_map.as_ref().map(|c| c.name.clone());
            name(a).cmp(&name(b))
        });
        volumes.push(Volume {
            name: "providers".into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(sources),
                ..ProjectedVolumeSource::default()
            }),
            ..Volume::default()
        });
        mounts.push(mount("providers", "/etc/pec/providers", true));
    }
    // Routes to every domain of the namespace: an aggregate the operator
    // keeps current and the gateway re-reads, so a new domain is reachable
    // without rolling the pods.
    volumes.push(Volume {
        name: "platform-routes".into(),
        config_map: Some(ConfigMapVolumeSource {
            name: super::routes::PLATFORM_ROUTES.into(),
            optional: Some(true),
            ..ConfigMapVolumeSource::default()
        }),
        ..Volume::default()
    });
    mounts.push(mount("platform-routes", ROUTES_DIR, true));
    if let Some(secret) = &md.spec.gateway.mailboxes_secret_ref {
        volumes.push(secret_volume(
            "credentials",
            secret,
            Some(("mailboxes", "mailboxes")),
        ));
        mounts.push(mount("credentials", "/etc/pec/credentials", true));
    }
    if let Some(secret) = &md.spec.gateway.tls_secret_ref {
        volumes.push(secret_volume("tls", secret, None));
        mounts.push(mount("tls", "/etc/pec/tls", true));
    }
    if let Some(claim) = &defaults.token_claim {
        volumes.push(Volume {
            name: "hsm-tokens".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim.clone(),
                ..PersistentVolumeClaimVolumeSource::default()
            }),
            ..Volume::default()
        });
        mounts.push(mount("hsm-tokens", TOKEN_DIR, false));
        env.push(EnvVar {
            name: "SOFTHSM2_CONF".into(),
            value: Some(format!("{CONFIG_DIR}/{SOFTHSM_CONF_KEY}")),
            ..EnvVar::default()
        });
    }
    (volumes, mounts, env)
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: read_only.then_some(true),
        ..VolumeMount::default()
    }
}

fn secret_volume(name: &str, secret: &str, item: Option<(&str, &str)>) -> Volume {
    Volume {
        name: name.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.to_string()),
            items: item.map(|(key, path)| {
                vec![KeyToPath {
                    key: key.into(),
                    path: path.into(),
                    ..KeyToPath::default()
                }]
            }),
            // Only the gateway user reads secrets.
            default_mode: Some(0o440),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::controllers::mail_domain::build::tests::domain;

    pub(crate) fn signing() -> GatewaySigning {
        GatewaySigning {
            config: SigningConfig {
                key: "acme-key".into(),
                token_label: "pec-hsm-1".into(),
                key_id: "00ff".into(),
                generation: 3,
                certificate_secret: "acme-key-certificates".into(),
                certificate_key: "g3.crt".into(),
                certificate_sha256: "ab".into(),
            },
            pin: SecretKeyRef {
                name: "hsm-pin".into(),
                key: "pin".into(),
            },
            index_config_map: "acme-key-index".into(),
        }
    }

    #[test]
    fn the_rendered_configuration_is_what_the_gateway_parses() {
        let mut md = domain(&["dc-it1"]);
        md.spec.gateway.tls_secret_ref = Some("acme-tls".into());
        md.spec.gateway.relay.smarthost = Some("relay.example:25".into());
        let config = gateway_config(&md, "dc-it1", Some(&signing()), &GatewayDefaults::default());
        let yaml = serde_yaml::to_string(&config).expect("renders");
        let parsed = GatewayConfig::from_yaml(&yaml).expect("the gateway accepts it");
        assert_eq!(parsed, config);
        assert_eq!(parsed.signing.map(|s| s.generation), Some(3));
        assert!(parsed.tls.is_some());
        assert_eq!(parsed.relay.smarthost.as_deref(), Some("relay.example:25"));
    }

    #[test]
    fn a_domain_without_a_clamd_asks_the_platforms_and_its_own_wins() {
        let defaults = GatewayDefaults {
            clamd: "tcp:clamd.antivirus.svc:3310".into(),
            ..GatewayDefaults::default()
        };
        let mut md = domain(&["dc-it1"]);
        let config = gateway_config(&md, "dc-it1", None, &defaults);
        assert_eq!(config.antivirus.clamd, "tcp:clamd.antivirus.svc:3310");
        md.spec.antivirus.clamd = Some("unix:/run/clamd.sock".into());
        let config = gateway_config(&md, "dc-it1", None, &defaults);
        assert_eq!(config.antivirus.clamd, "unix:/run/clamd.sock");
        assert_eq!(
            gateway_config(
                &domain(&["dc-it1"]),
                "dc-it1",
                None,
                &GatewayDefaults::default()
            )
            .antivirus
            .clamd,
            DEFAULT_CLAMD
        );
    }

    #[test]
    fn every_path_in_the_configuration_is_mounted() {
        let mut md = domain(&["dc-it1"]);
        md.spec.gateway.tls_secret_ref = Some("acme-tls".into());
        md.spec.gateway.mailboxes_secret_ref = Some("acme-mailboxes".into());
        md.spec.gateway.providers = vec!["other-key-index".into()];
        md.spec.gateway.storage_claim_name = Some("pec-mail".into());
        let defaults = GatewayDefaults {
            token_claim: Some("softhsm-tokens".into()),
            ..GatewayDefaults::default()
        };
        let config = gateway_config(&md, "dc-it1", Some(&signing()), &defaults);
        let (volumes, mounts, env) = volumes(&md, Some(&signing()), &defaults, "acme-dc-it1");
        let mounted =
            |path: &std::path::Path| mounts.iter().any(|m| path.starts_with(&m.mount_path));
        for path in [
            config.hsm.pin_file.clone(),
            config.paths.mailboxes.clone(),
            config.paths.queue.clone(),
            config.paths.log.clone(),
            config.paths.certificates.join("g3.crt"),
            config.paths.providers[0].clone(),
            config.paths.credentials.clone(),
            config.tls.clone().expect("tls").cert_file,
            config.relay.routes_file.clone().expect("routes file"),
        ] {
            assert!(mounted(&path), "{} is not mounted", path.display());
        }
        for m in &mounts {
            assert!(
                volumes.iter().any(|v| v.name == m.name),
                "mount {} has a volume",
                m.name
            );
        }
        let data = mounts
            .iter()
            .find(|m| m.name == "data")
            .expect("data mount");
        assert_eq!(data.sub_path_expr.as_deref(), Some("$(POD_NAME)"));
        let mailboxes = mounts
            .iter()
            .find(|m| m.mount_path == "/var/lib/pec/mailboxes")
            .expect("a mailbox mount shared by the domain's pods");
        assert_eq!(
            (mailboxes.name.as_str(), mailboxes.sub_path.as_deref()),
            ("data", Some("mailboxes"))
        );
        assert!(env.iter().any(|e| e.name == "SOFTHSM2_CONF"));
        let pin = volumes
            .iter()
            .find(|v| v.name == "hsm-pin")
            .and_then(|v| v.secret.clone())
            .expect("pin");
        assert_eq!(pin.secret_name.as_deref(), Some("hsm-pin"));
        let providers = volumes
            .iter()
            .find(|v| v.name == "providers")
            .and_then(|v| v.projected.clone())
            .expect("providers");
        let names: Vec<String> = providers
            .sources
            .iter()
            .flatten()
            .filter_map(|s| s.config_map.as_ref().map(|c| c.name.clone()))
            .collect();
        assert_eq!(
            names,
            ["acme-key-index", "other-key-index", PLATFORM_PROVIDERS],
            "own index, the listed provider and the platform's keys"
        );
    }

    #[test]
    fn without_a_key_or_secrets_nothing_is_mounted_for_them() {
        let md = domain(&["dc-it1"]);
        let (volumes, _, env) = volumes(&md, None, &GatewayDefaults::default(), "acme-dc-it1");
        let names: Vec<&str> = volumes.iter().map(|v| v.name.as_str()).collect();
        // Even a domain that signs nothing yet trusts the platform's keys
        // and knows the platform's routes.
        assert_eq!(
            names,
            ["config", "tmp", "data", "providers", "platform-routes"]
        );
        let routes = volumes
            .iter()
            .find(|v| v.name == "platform-routes")
            .and_then(|v| v.config_map.clone())
            .expect("a ConfigMap volume");
        assert_eq!(
            (routes.name.as_str(), routes.optional),
            (super::super::routes::PLATFORM_ROUTES, Some(true)),
            "a pod must start before the routes exist"
        );
        assert!(!env.iter().any(|e| e.name == "SOFTHSM2_CONF"));
    }
}
