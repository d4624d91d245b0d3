#!/usr/bin/env python3
"""Assemble a reproducible OCI image from a dynamically linked binary.

No container daemon, no registry, Python 3 standard library only. Given a
binary, this program writes

  OUT/NAME-VERSION.oci/      an OCI image layout (oci-layout, index.json, blobs/)
  OUT/NAME-VERSION.oci.tar   the same layout as one tar (an "OCI archive"),
                             importable with `ctr images import`

and prints one line: NAME REF DIGEST ARCHIVE (DIGEST is the manifest's).

The image has two layers, both built from files of this machine:

  1. base: /etc/passwd, /etc/group, /etc/nsswitch.conf, the CA bundle, the
     modules the binaries dlopen (SoftHSM2's PKCS#11 module) and the shared
     libraries those need (their `ldd` closure, which includes glibc).
  2. app:  /usr/local/bin/NAME and whatever library of its own closure the
     base does not already hold (normally none: a Rust binary needs only
     glibc and libgcc_s, which the base has for the module's sake).

Why two: the base layer does not depend on the binary, so the operator and
the gateway images share the very same base blob (containerd stores and
imports it once), and rebuilding after a code change only produces a new,
small app layer.

Reproducibility: the same inputs (binary, host libraries, SOURCE_DATE_EPOCH)
give the same bytes, hence the same digests:
  * tar entries sorted by path, every parent directory listed explicitly
    (0755), owner 0:0 with empty user/group names, mtime = SOURCE_DATE_EPOCH,
    PAX format without any extended header (no atime/ctime; names are short
    ASCII so none is ever needed), regular files 0755 or 0644 from the host's
    executable bit only;
  * gzip header without file name and with mtime 0, fixed compression level;
  * JSON with sorted keys and compact separators;
  * the OCI archive is itself a tar written by the same rules.
"""

import argparse
import datetime
import gzip
import hashlib
import io
import json
import os
import posixpath
import shutil
import subprocess
import sys
import tarfile
import tempfile

MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"

# ELF e_machine -> OCI architecture.
ELF_ARCH = {62: "amd64", 183: "arm64", 3: "386", 40: "arm", 243: "riscv64", 22: "s390x", 21: "ppc64le"}

USER_ID = 65532
GZIP_LEVEL = 6
CHUNK = 1 << 20


def die(msg):
    print(f"oci.py: {msg}", file=sys.stderr)
    sys.exit(1)


def canonical_json(obj):
    """The one JSON encoding used for every config, manifest and index."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


# --------------------------------------------------------------------------
# Host files: ldd closures and symlink-faithful copies
# --------------------------------------------------------------------------

def elf_arch(path):
    with open(path, "rb") as f:
        head = f.read(20)
    if head[:4] != b"\x7fELF":
        die(f"{path} is not an ELF file")
    little = head[5] == 1
    machine = int.from_bytes(head[18:20], "little" if little else "big")
    if machine not in ELF_ARCH:
        die(f"{path}: unknown ELF machine {machine}")
    return ELF_ARCH[machine]


def ldd_closure(path):
    """Absolute paths of every shared object `path` loads, from `ldd`.

    ldd already lists the transitive closure, the dynamic loader included.
    A statically linked file has an empty closure; a missing library is fatal.
    """
    env = dict(os.environ, LC_ALL="C")
    proc = subprocess.run(["ldd", path], capture_output=True, text=True, env=env)
    text = proc.stdout + proc.stderr
    if "not a dynamic executable" in text or "statically linked" in text:
        return []
    if proc.returncode != 0:
        die(f"ldd {path} failed: {text.strip()}")
    libs = []
    for line in proc.stdout.splitlines():
        line = line.strip()
        if "=> not found" in line:
            die(f"ldd {path}: {line}")
        if "=>" in line:                      # libc.so.6 => /lib/.../libc.so.6 (0x...)
            target = line.split("=>", 1)[1].strip().split(" (")[0].strip()
        else:                                 # /lib64/ld-linux-x86-64.so.2 (0x...)
            target = line.split(" (")[0].strip()
        if target.startswith("/"):            # linux-vdso.so.1 has no file
            libs.append(target)
    return libs


class Tree:
    """The files of one layer: path (no leading '/') -> entry.

    An entry is ("dir",), ("file", mode, host_path_or_None, bytes_or_None)
    or ("symlink", target).
    """

    def __init__(self):
        self.entries = {}

    def _put(self, path, entry):
        old = self.entries.get(path)
        if old is not None and old != entry:
            die(f"/{path} added twice, differently: {old[:2]} vs {entry[:2]}")
        self.entries[path] = entry

    def add_dirs(self, path):
        """Every ancestor directory of `path`, listed explicitly."""
        parent = posixpath.dirname(path)
        while parent:
            self._put(parent, ("dir",))
            parent = posixpath.dirname(parent)

    def add_bytes(self, path, data, mode=0o644):
        path = path.lstrip("/")
        self.add_dirs(path)
        self._put(path, ("file", mode, None, data))

    def add_copy(self, path, host_path, mode):
        path = path.lstrip("/")
        self.add_dirs(path)
        self._put(path, ("file", mode, host_path, None))

    def add_symlink(self, path, target):
        path = path.lstrip("/")
        self.add_dirs(path)
        self._put(path, ("symlink", target))

    def add_host_path(self, host_path):
        """Copy a host file to the same path, keeping every symlink on the way.

        /lib64/ld-linux-x86-64.so.2 on Debian 12 becomes the symlinks
        /lib64 -> usr/lib64, /usr/lib64/ld-linux-x86-64.so.2 ->
        /lib/x86_64-linux-gnu/ld-linux-x86-64.so.2, /lib -> usr/lib, and the
        regular file /usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2: the
        names the loader (and dlopen callers) use resolve in the image as on
        the host. Returns the real path.
        """
        parts = [p for p in host_path.split("/") if p]
        cur = ""  # resolved prefix: real directories only
        hops = 0
        while parts:
            comp = parts.pop(0)
            if comp == ".":
                continue
            if comp == "..":
                cur = posixpath.dirname(cur)
                if cur == "/":
                    cur = ""
                continue
            cand = f"{cur}/{comp}"
            if os.path.islink(cand):
                hops += 1
                if hops > 40:
                    die(f"too many symlinks resolving {host_path}")
                target = os.readlink(cand)
                self.add_symlink(cand, target)
                if target.startswith("/"):
                    cur = ""
                parts = [p for p in target.split("/") if p] + parts
                continue
            cur = cand
        if not os.path.isfile(cur):
            die(f"{host_path} -> {cur} is not a regular file")
        mode = 0o755 if os.stat(cur).st_mode & 0o111 else 0o644
        self.add_copy(cur, cur, mode)
        return cur


# --------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------

def tar_info(name, kind, epoch, mode=0o644, size=0, target=""):
    """A TarInfo with nothing of the build machine in it."""
    ti = tarfile.TarInfo(name)
    ti.mtime = epoch
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    if kind == "dir":
        ti.type, ti.mode = tarfile.DIRTYPE, 0o755
    elif kind == "symlink":
        ti.type, ti.mode, ti.linkname = tarfile.SYMTYPE, 0o777, target
    else:
        ti.type, ti.mode, ti.size = tarfile.REGTYPE, mode, size
    return ti


def open_tar(fileobj):
    # PAX format: plain ustar headers, an extended header only where ustar
    # cannot say it (never, for our short ASCII names).
    return tarfile.open(fileobj=fileobj, mode="w", format=tarfile.PAX_FORMAT)


def write_layer_tar(tree, dest, epoch):
    """Write `tree` as an uncompressed, deterministic tar to `dest`."""
    with open(dest, "wb") as raw, open_tar(raw) as tar:
        for path in sorted(tree.entries):
            entry = tree.entries[path]
            if entry[0] == "dir":
                tar.addfile(tar_info(path, "dir", epoch))
            elif entry[0] == "symlink":
                tar.addfile(tar_info(path, "symlink", epoch, target=entry[1]))
            else:
                _, mode, host_path, data = entry
                if host_path is not None:
                    with open(host_path, "rb") as f:
                        size = os.fstat(f.fileno()).st_size
                        tar.addfile(tar_info(path, "file", epoch, mode, size), f)
                else:
                    tar.addfile(tar_info(path, "file", epoch, mode, len(data)), io.BytesIO(data))


class Blobs:
    """blobs/sha256/ of a layout being written."""

    def __init__(self, layout):
        self.dir = os.path.join(layout, "blobs", "sha256")
        os.makedirs(self.dir, exist_ok=True)

    def add_bytes(self, data, media_type):
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        with open(os.path.join(self.dir, digest[7:]), "wb") as f:
            f.write(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def add_file(self, path, media_type):
        """Move a finished file in as a blob."""
        digest = sha256_file(path)
        size = os.path.getsize(path)
        os.replace(path, os.path.join(self.dir, digest[7:]))
        return {"mediaType": media_type, "digest": digest, "size": size}


def add_layer(blobs, tree, epoch, scratch):
    """Tar + gzip one layer; returns (descriptor, diff_id)."""
    tar_path = os.path.join(scratch, "layer.tar")
    gz_path = os.path.join(scratch, "layer.tar.gz")
    write_layer_tar(tree, tar_path, epoch)
    diff_id = sha256_file(tar_path)  # of the *uncompressed* tar
    with open(tar_path, "rb") as src, open(gz_path, "wb") as raw:
        # filename="" leaves FNAME out of the header; mtime=0 fixes MTIME.
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=GZIP_LEVEL, mtime=0) as gz:
            shutil.copyfileobj(src, gz, CHUNK)
    os.unlink(tar_path)
    return blobs.add_file(gz_path, MT_LAYER), diff_id


# --------------------------------------------------------------------------
# Image contents
# --------------------------------------------------------------------------

def etc_files(tree):
    tree.add_bytes("etc/passwd",
                   b"root:x:0:0:root:/root:/sbin/nologin\n"
                   b"pec:x:%d:%d:pec:/nonexistent:/sbin/nologin\n" % (USER_ID, USER_ID))
    tree.add_bytes("etc/group", b"root:x:0:\npec:x:%d:\n" % USER_ID)
    tree.add_bytes("etc/nsswitch.conf", b"passwd: files\ngroup: files\nhosts: files dns\n")


def base_tree(modules, files):
    """Layer 1: identity files, CA bundle, dlopen'ed modules and their closure."""
    tree = Tree()
    etc_files(tree)
    for path in files:
        if os.path.exists(path):
            tree.add_host_path(path)
        else:
            print(f"oci.py: {path} not found on this machine, left out", file=sys.stderr)
    for module in modules:
        if not os.path.exists(module):
            die(f"module {module} not found (install it, e.g. apt-get install softhsm2)")
        tree.add_host_path(module)
        for lib in ldd_closure(module):
            tree.add_host_path(lib)
    return tree


def app_tree(name, binary, base):
    """Layer 2: the binary and the part of its closure the base lacks."""
    tree = Tree()
    tree.add_copy(f"usr/local/bin/{name}", os.path.realpath(binary), 0o755)
    for lib in ldd_closure(binary):
        probe = Tree()
        probe.add_host_path(lib)
        for path, entry in probe.entries.items():
            if base.entries.get(path) != entry:
                tree.add_dirs(path)
                tree._put(path, entry)
    return tree


def rfc3339(epoch):
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------
# Layout and archive
# --------------------------------------------------------------------------

def write_archive(layout, dest, epoch):
    """The layout directory as one deterministic tar (an OCI archive)."""
    names = []
    for dirpath, dirnames, filenames in os.walk(layout):
        rel = os.path.relpath(dirpath, layout)
        for d in dirnames:
            names.append((posixpath.normpath(posixpath.join(rel, d)), "dir"))
        for f in filenames:
            names.append((posixpath.normpath(posixpath.join(rel, f)), "file"))
    with open(dest, "wb") as raw, open_tar(raw) as tar:
        for rel, kind in sorted(names):
            if kind == "dir":
                tar.addfile(tar_info(rel, "dir", epoch))
            else:
                full = os.path.join(layout, rel)
                with open(full, "rb") as f:
                    tar.addfile(tar_info(rel, "file", epoch, 0o644, os.fstat(f.fileno()).st_size), f)


def build(args):
    epoch = args.epoch
    arch = elf_arch(args.binary)
    ref = f"{args.repo}/{args.name}:{args.version}"
    args.out = os.path.abspath(args.out)
    os.makedirs(args.out, exist_ok=True)
    final_layout = os.path.join(args.out, f"{args.name}-{args.version}.oci")
    final_archive = final_layout + ".tar"

    # Everything is written in a scratch directory next to the outputs and
    # moved into place at the end: an interrupted build leaves no half image.
    scratch = tempfile.mkdtemp(prefix=f".{args.name}-", dir=args.out)
    try:
        layout = os.path.join(scratch, "layout")
        blobs = Blobs(layout)

        base = base_tree(args.module, args.file)
        app = app_tree(args.name, args.binary, base)
        base_desc, base_diff = add_layer(blobs, base, epoch, scratch)
        app_desc, app_diff = add_layer(blobs, app, epoch, scratch)

        created = rfc3339(epoch)
        config = {
            "architecture": arch,
            "os": "linux",
            "created": created,
            "config": {
                "User": f"{USER_ID}:{USER_ID}",
                "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"],
                "Entrypoint": [f"/usr/local/bin/{args.name}"],
                "WorkingDir": "/",
                "ExposedPorts": {p: {} for p in args.port},
                "Labels": {
                    "org.opencontainers.image.title": args.name,
                    "org.opencontainers.image.version": args.version,
                },
            },
            "rootfs": {"type": "layers", "diff_ids": [base_diff, app_diff]},
            "history": [
                {"created": created, "created_by": "e2e/images/oci.py: base (etc, CA bundle, PKCS#11 module, shared libraries)"},
                {"created": created, "created_by": f"e2e/images/oci.py: /usr/local/bin/{args.name}"},
            ],
        }
        if not args.port:
            del config["config"]["ExposedPorts"]
        config_desc = blobs.add_bytes(canonical_json(config), MT_CONFIG)

        manifest = {
            "schemaVersion": 2,
            "mediaType": MT_MANIFEST,
            "config": config_desc,
            "layers": [base_desc, app_desc],
        }
        manifest_desc = blobs.add_bytes(canonical_json(manifest), MT_MANIFEST)
        manifest_desc["platform"] = {"architecture": arch, "os": "linux"}
        manifest_desc["annotations"] = {
            # containerd names the imported image after this one...
            "io.containerd.image.name": ref,
            # ...the OCI spec's tag, for other tools (skopeo oci:DIR:TAG).
            "org.opencontainers.image.ref.name": args.version,
        }
        index = {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": [manifest_desc]}
        with open(os.path.join(layout, "index.json"), "wb") as f:
            f.write(canonical_json(index))
        with open(os.path.join(layout, "oci-layout"), "wb") as f:
            f.write(canonical_json({"imageLayoutVersion": "1.0.0"}))

        archive = os.path.join(scratch, "archive.tar")
        write_archive(layout, archive, epoch)

        # Swap the results in.
        if os.path.isdir(final_layout):
            shutil.rmtree(final_layout)
        os.replace(layout, final_layout)
        os.replace(archive, final_archive)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print(f"{args.name} {ref} {manifest_desc['digest']} {final_archive}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", required=True, help="image and binary name, e.g. pec-gateway")
    p.add_argument("--version", required=True, help="image tag, e.g. 0.1.0")
    p.add_argument("--binary", required=True, help="the dynamically linked binary")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--epoch", type=int, default=0, help="SOURCE_DATE_EPOCH: mtimes and 'created'")
    p.add_argument("--repo", default="docker.io/pec", help="name prefix of the reference")
    p.add_argument("--port", action="append", default=[], help="exposed port, e.g. 25/tcp (repeatable)")
    p.add_argument("--module", action="append", default=[],
                   help="a shared object the binary dlopens, added with its ldd closure (repeatable)")
    p.add_argument("--file", action="append", default=[],
                   help="a host file copied at the same path if it exists (repeatable)")
    args = p.parse_args()
    if not os.path.isfile(args.binary):
        die(f"binary {args.binary} not found")
    build(args)


if __name__ == "__main__":
    main()
