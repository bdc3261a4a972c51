#!/usr/bin/env bash
# Checks that the Docker build context builds. With a Docker daemon: `docker build`, then the
# image's health check command against a running container. Without one: the files the
# Dockerfile COPYs into its build stage, less what .dockerignore leaves out, are copied to a
# temporary directory and the build stage's cargo command runs there, reusing CARGO_TARGET_DIR
# (default ./target). Cargo loads the whole workspace from the copy, and finds the gateway fresh
# only if every source file its last build read is in the copy, unchanged (the copy keeps the
# files' times); otherwise it compiles the copy. Every file the runtime stage COPYs from the
# context is checked to be in the context too.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

if docker info >/dev/null 2>&1; then
    echo "docker_check: building the image with docker"
    docker build -t topicgate:ci-check .
    id=$(docker run -d --rm topicgate:ci-check)
    trap 'docker rm -f "$id" >/dev/null 2>&1 || true' EXIT
    for _ in $(seq 1 100); do
        docker exec "$id" /usr/local/bin/topicgate healthcheck 2>/dev/null && break
        sleep 0.2
    done
    docker exec "$id" /usr/local/bin/topicgate healthcheck
    [[ $(docker exec "$id" id -u) != 0 ]] || { echo "docker_check: the image runs as root" >&2; exit 1; }
    echo "ok - docker build, healthcheck and non-root user"
    exit 0
fi

echo "docker_check: no Docker daemon; building the Dockerfile's context by hand"
CONTEXT=$(mktemp -d)
trap 'rm -rf "$CONTEXT"' EXIT

# The Dockerfile's COPY sources (build stage, runtime stage) and the build stage's RUN command.
python3 - "$ROOT" "$CONTEXT" <<'PY'
import fnmatch, os, re, shutil, sys

root, context = sys.argv[1], sys.argv[2]
lines = open(os.path.join(root, "Dockerfile"), encoding="utf-8").read().replace("\\\n", " ").splitlines()
stages, run = [], None
for line in lines:
    words = line.split()
    if not words or words[0].startswith("#"):
        continue
    op = words[0].upper()
    if op == "FROM":
        stages.append([])
    elif op == "COPY" and not any(w.startswith("--from") for w in words[1:]):
        args = [w for w in words[1:] if not w.startswith("--")]
        stages[-1].extend(args[:-1])
    elif op == "RUN" and len(stages) == 1 and "cargo build" in line:
        run = line.split(None, 1)[1]
if run is None:
    sys.exit("docker_check: no `RUN cargo build` in the Dockerfile's build stage")

patterns = []
for p in open(os.path.join(root, ".dockerignore"), encoding="utf-8").read().splitlines():
    p = p.strip()
    if p and not p.startswith("#"):
        patterns.append(p.lstrip("/").rstrip("/"))

def ignored(rel):
    # Docker's rule: a path is out when it, or a directory above it, matches a pattern;
    # `**` matches any number of directories.
    parts = rel.split("/")
    out = False
    for pattern in patterns:
        neg = pattern.startswith("!")
        pat = pattern[1:] if neg else pattern
        regex = re.escape(pat).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            out = not neg
    return out

def copy(src):
    path = os.path.join(root, src)
    if not os.path.exists(path) or ignored(src):
        sys.exit(f"docker_check: the Dockerfile COPYs {src}, which is not in the build context")
    if os.path.isfile(path):
        os.makedirs(os.path.dirname(os.path.join(context, src)) or context, exist_ok=True)
        shutil.copy2(path, os.path.join(context, src))
        return
    for dirpath, dirnames, filenames in os.walk(path):
        rel_dir = os.path.relpath(dirpath, root)
        dirnames[:] = [d for d in dirnames if not ignored(f"{rel_dir}/{d}")]
        for f in filenames:
            rel = f"{rel_dir}/{f}"
            if not ignored(rel):
                os.makedirs(os.path.join(context, rel_dir), exist_ok=True)
                shutil.copy2(os.path.join(root, rel), os.path.join(context, rel))

for stage in stages:
    for src in stage:
        copy(src)
open(os.path.join(context, ".build-command"), "w").write(run)
print("docker_check: context of", sum(len(files) for _, _, files in os.walk(context)) - 1, "files; build:", run)
PY

command=$(cat "$CONTEXT/.build-command")
rm "$CONTEXT/.build-command"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
(cd "$CONTEXT" && bash -c "$command")
echo "ok - the Docker build context builds ($command)"
