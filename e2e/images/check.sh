#!/usr/bin/env bash
# Check e2e/images/build.sh: two builds into two temp dirs give the same
# digests and byte-identical archives, and every image layout is valid and
# complete.
#
#   e2e/images/check.sh [build.sh arguments...]       e.g. --profile debug all
#   PEC_IMAGE_BINARY=/usr/bin/openssl e2e/images/check.sh     (fast: no cargo)
#
# Validated per image, independently of oci.py: every blob's sha256 and size
# match its descriptor, diff_ids match the uncompressed layers, no unreferenced
# blob, canonical JSON, gzip header without name and mtime, tar entries sorted
# with explicit parent directories, owner 0:0, no user/group names, mtime =
# `created`, no PAX extended headers; the config (user, entrypoint, ports); and
# the run-time closure: the loader and every DT_NEEDED soname of the binary and
# of SoftHSM2's module, recursively, resolve inside the image's files. As root
# it also runs the image's own loader in a chroot of the image
# (`ld.so --list`), which fails on any library it cannot find.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

args=("$@")
if [ -n "${PEC_IMAGE_BINARY:-}" ]; then
  args=(--binary "$PEC_IMAGE_BINARY" "${args[@]}")
  case " ${args[*]} " in *" operator "*|*" gateway "*) ;; *) args+=(operator) ;; esac
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/pec-images-check.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

echo "check.sh: build 1: build.sh --out $tmp/1 ${args[*]}"
"$here/build.sh" --out "$tmp/1" "${args[@]}" | tee "$tmp/1.txt"
echo "check.sh: build 2: build.sh --out $tmp/2 ${args[*]}"
"$here/build.sh" --out "$tmp/2" "${args[@]}" | tee "$tmp/2.txt"

# NAME REF DIGEST must agree (ARCHIVE differs by directory only).
if ! diff <(cut -d' ' -f1-3 "$tmp/1.txt") <(cut -d' ' -f1-3 "$tmp/2.txt"); then
  # Say which layer differs: only the app layer (layer 1) means the binary
  # itself changed between the builds, e.g. sources edited or another cargo
  # run relinking it in a shared target directory.
  for layout in "$tmp"/1/*.oci; do
    python3 - "$layout" "$tmp/2/$(basename "$layout")" <<'EOF'
import json, sys
def diff_ids(layout):
    index = json.load(open(f"{layout}/index.json"))
    algo, hexd = index["manifests"][0]["digest"].split(":")
    manifest = json.load(open(f"{layout}/blobs/{algo}/{hexd}"))
    algo, hexd = manifest["config"]["digest"].split(":")
    return json.load(open(f"{layout}/blobs/{algo}/{hexd}"))["rootfs"]["diff_ids"]
a, b = diff_ids(sys.argv[1]), diff_ids(sys.argv[2])
for i, (x, y) in enumerate(zip(a, b)):
    print(f"check.sh: {sys.argv[1].rsplit('/', 1)[1]}: layer {i} ({['base', 'app: the binary'][min(i, 1)]}) "
          + ("same" if x == y else f"DIFFERS: {x} vs {y}"))
EOF
  done
  echo "check.sh: FAIL: the two builds gave different digests" >&2; exit 1
fi
echo "check.sh: ok: same manifest digests in both builds"
while read -r name _ _ archive; do
  cmp "$archive" "$tmp/2/$(basename "$archive")"
  echo "check.sh: ok: $name archives byte-identical ($(stat -c %s "$archive") bytes)"
done <"$tmp/1.txt"

while read -r name ref digest archive; do
  python3 - "${archive%.tar}" "$digest" "$tmp/rootfs-$name" <<'EOF'
import datetime, gzip, hashlib, io, json, os, posixpath, subprocess, sys, tarfile
layout, want_digest, rootfs = sys.argv[1:4]
name = os.path.basename(layout).rsplit("-", 1)[0]
def ok(msg): print(f"check.sh: ok: {name}: {msg}")
def fail(msg): sys.exit(f"check.sh: FAIL: {name}: {msg}")

def blob(desc):  # read a blob, checking name, digest and size
    algo, hexd = desc["digest"].split(":")
    path = os.path.join(layout, "blobs", algo, hexd)
    data = open(path, "rb").read()
    if algo != "sha256" or hashlib.sha256(data).hexdigest() != hexd: fail(f"{path}: sha256 mismatch")
    if len(data) != desc["size"]: fail(f"{path}: size {len(data)} != {desc['size']}")
    seen.add(hexd)
    return data
def canon(data):
    obj = json.loads(data)
    if json.dumps(obj, sort_keys=True, separators=(",", ":")).encode() != data: fail("non-canonical JSON")
    return obj

seen = set()
if json.load(open(f"{layout}/oci-layout")) != {"imageLayoutVersion": "1.0.0"}: fail("oci-layout")
index = canon(open(f"{layout}/index.json", "rb").read())
[mdesc] = index["manifests"]
if mdesc["digest"] != want_digest: fail("index digest differs from the printed one")
print(f"check.sh: ok: {name}: index names {mdesc['annotations']}")
manifest = canon(blob(mdesc))
config = canon(blob(manifest["config"]))
layers = [blob(d) for d in manifest["layers"]]
diff_ids = config["rootfs"]["diff_ids"]
if len(diff_ids) != len(layers): fail("diff_ids/layers count")
epoch = int(datetime.datetime.strptime(config["created"], "%Y-%m-%dT%H:%M:%S%z").timestamp())
tars = []
for gz, diff_id in zip(layers, diff_ids):
    if gz[3] & 0x08 or gz[4:8] != b"\0\0\0\0": fail("gzip header has a file name or an mtime")
    raw = gzip.decompress(gz)
    if "sha256:" + hashlib.sha256(raw).hexdigest() != diff_id: fail(f"diff_id {diff_id} mismatch")
    tars.append(raw)
unref = set(os.listdir(f"{layout}/blobs/sha256")) - seen
if unref: fail(f"unreferenced blobs {unref}")
ok(f"{len(seen)} blobs: sha256 and sizes match; {len(diff_ids)} diff_ids match the uncompressed layers; JSON canonical")

for i, raw in enumerate(tars):
    with tarfile.open(fileobj=io.BytesIO(raw)) as t:
        members = t.getmembers()
    names = [m.name.rstrip("/") for m in members]
    if names != sorted(names): fail(f"layer {i}: entries not sorted")
    dirs = {m.name.rstrip("/") for m in members if m.isdir()}
    for m in members:
        if (m.uid, m.gid, m.uname, m.gname) != (0, 0, "", ""): fail(f"{m.name}: owner {m.uid}:{m.gid} {m.uname}:{m.gname}")
        if m.mtime != epoch: fail(f"{m.name}: mtime {m.mtime} != {epoch}")
        if m.pax_headers: fail(f"{m.name}: pax headers {m.pax_headers}")
        if m.isdir() and m.mode != 0o755: fail(f"{m.name}: dir mode {oct(m.mode)}")
        parent = posixpath.dirname(m.name.rstrip("/"))
        if parent and parent not in dirs: fail(f"{m.name}: parent {parent} not listed in layer {i}")
    ok(f"layer {i}: {len(members)} entries sorted, parents listed, 0:0, no names, mtime {epoch}, no pax headers, {len(raw)} bytes")

c = config["config"]
entry = c["Entrypoint"][0]
if c["User"] != "65532:65532" or c["WorkingDir"] != "/" or c["Env"] != ["PATH=/usr/local/bin:/usr/bin:/bin"]: fail(f"config {c}")
ok(f"config: User {c['User']}, Entrypoint {c['Entrypoint']}, ports {sorted(c.get('ExposedPorts', {}))}, labels {c['Labels']}")

# Unpack (layers in order; there are no whiteouts) and check the closure.
os.makedirs(rootfs)
for raw in tars:
    with tarfile.open(fileobj=io.BytesIO(raw)) as t:
        t.extractall(rootfs, filter="tar")
def inroot(path, hops=0):  # resolve an absolute image path inside rootfs
    cur = ""
    parts = [p for p in path.split("/") if p]
    while parts:
        comp = parts.pop(0)
        if comp == "..": cur = posixpath.dirname(cur).rstrip("/"); continue
        cand = f"{cur}/{comp}"
        if os.path.islink(rootfs + cand):
            hops += 1
            if hops > 40: return None
            target = os.readlink(rootfs + cand)
            if target.startswith("/"): cur = ""
            parts = [p for p in target.split("/") if p] + parts
            continue
        if not os.path.lexists(rootfs + cand): return None
        cur = cand
    return rootfs + cur
def elf(path):  # (PT_INTERP, [DT_NEEDED]) of an ELF64 little-endian file
    f = open(path, "rb"); hdr = f.read(64)
    if hdr[:4] != b"\x7fELF" or hdr[4] != 2 or hdr[5] != 1: fail(f"{path}: not ELF64 LE")
    u = lambda b, o, n: int.from_bytes(b[o:o + n], "little")
    phoff, phentsize, phnum = u(hdr, 32, 8), u(hdr, 54, 2), u(hdr, 56, 2)
    f.seek(phoff); ph = f.read(phentsize * phnum)
    interp, dyn, loads = None, None, []
    for i in range(phnum):
        p = ph[i * phentsize:(i + 1) * phentsize]
        typ, off, vaddr, filesz = u(p, 0, 4), u(p, 8, 8), u(p, 16, 8), u(p, 32, 8)
        if typ == 3: f.seek(off); interp = f.read(filesz).rstrip(b"\0").decode()
        elif typ == 2: dyn = (off, filesz)
        elif typ == 1: loads.append((vaddr, off, filesz))
    if dyn is None: return interp, []
    f.seek(dyn[0]); d = f.read(dyn[1])
    tags = [(u(d, i, 8), u(d, i + 8, 8)) for i in range(0, len(d), 16)]
    strtab = next(v for t, v in tags if t == 5)
    stroff = next(off + strtab - va for va, off, sz in loads if va <= strtab < va + sz)
    def string(o):
        f.seek(stroff + o); return f.read(256).split(b"\0")[0].decode()
    return interp, [string(v) for t, v in tags if t == 1]
multiarch = {"amd64": "x86_64-linux-gnu", "arm64": "aarch64-linux-gnu"}[config["architecture"]]
search = [f"/lib/{multiarch}", f"/usr/lib/{multiarch}", "/lib", "/usr/lib"]
roots = [entry] + [m for m in ["/usr/lib/softhsm/libsofthsm2.so"] if inroot(m)]
interp = None
for start in roots:
    real = inroot(start)
    if real is None or not os.path.isfile(real): fail(f"{start} missing")
    if start == entry and os.stat(real).st_mode & 0o777 != 0o755: fail(f"{entry} not 0755")
    todo, done = [real], {}
    while todo:
        path = todo.pop()
        i, needed = elf(path)
        if i:
            interp = interp or i
            if inroot(i) is None: fail(f"loader {i} of {path} missing")
            done[i] = inroot(i)
        for so in needed:
            if so in done: continue
            hit = next((inroot(f"{d}/{so}") for d in search if inroot(f"{d}/{so}")), None)
            if hit is None: fail(f"{so} (needed by {path[len(rootfs):]}) not found in {search}")
            done[so] = hit; todo.append(hit)
    ok(f"closure of {start}: " + ", ".join(sorted(done)) + " all present")
if os.geteuid() == 0 and interp:
    for start in roots:
        r = subprocess.run(["chroot", rootfs, interp, "--list", start], capture_output=True, text=True)
        if r.returncode != 0 or "not found" in r.stdout:
            fail(f"chroot ld.so --list {start}: rc {r.returncode}\n{r.stdout}{r.stderr}")
        ok(f"chroot {interp} --list {start}: {len(r.stdout.splitlines())} objects, none missing")
else:
    print(f"check.sh: skip: {name}: chroot loader check (needs root)")
EOF
  rm -rf "$tmp/rootfs-$name"
done <"$tmp/1.txt"
echo "check.sh: all checks passed"
