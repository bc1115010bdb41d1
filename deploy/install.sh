#!/bin/sh
# Installs easel as a systemd service running the drop-folder daemon (see deploy/DAEMON.md).
#
#   sudo deploy/install.sh [--binary PATH] [--root DIR] [--weights FILE] [--fetch-weights] [--no-start]
#
# --binary         the easel executable to install (default: target/release/easel, or
#                  target/aarch64-unknown-linux-gnu/release/easel on an aarch64 machine)
# --root           the drop folder (default /srv/easel)
# --weights FILE   copy this VGG-19 safetensors file to /var/lib/easel/vgg19.safetensors
# --fetch-weights  download the pretrained weights instead (548 MB, `easel weights fetch`)
# --no-start       install and enable, but do not start now
#
# Safe to run again: an existing /etc/easel/daemon.toml is kept; the unit and binary are updated.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
binary=""
root=/srv/easel
weights=""
fetch=no
start=yes

while [ $# -gt 0 ]; do
    case "$1" in
        --binary) binary=$2; shift 2 ;;
        --root) root=$2; shift 2 ;;
        --weights) weights=$2; shift 2 ;;
        --fetch-weights) fetch=yes; shift ;;
        --no-start) start=no; shift ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

if [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: run as root (sudo)" >&2
    exit 1
fi

if [ -z "$binary" ]; then
    binary=$repo/target/release/easel
    if [ "$(uname -m)" = aarch64 ] && [ -x "$repo/target/aarch64-unknown-linux-gnu/release/easel" ]; then
        binary=$repo/target/aarch64-unknown-linux-gnu/release/easel
    fi
fi
if [ ! -x "$binary" ]; then
    echo "install.sh: no easel binary at $binary; build it (cargo build --release) or pass --binary" >&2
    exit 1
fi
"$binary" --version >/dev/null || { echo "install.sh: $binary does not run on this machine" >&2; exit 1; }

echo "installing $binary to /usr/local/bin/easel"
install -m 0755 "$binary" /usr/local/bin/easel.new
mv -f /usr/local/bin/easel.new /usr/local/bin/easel

if ! id easel >/dev/null 2>&1; then
    echo "creating system user easel"
    useradd --system --home-dir /var/lib/easel --shell /usr/sbin/nologin easel
fi

install -d -m 0755 -o easel -g easel /var/lib/easel
install -d -m 0755 /etc/easel
install -d -m 2775 -o easel -g easel "$root"
for dir in inbox work out done failed styles; do
    install -d -m 2775 -o easel -g easel "$root/$dir"
done

if [ -n "$weights" ]; then
    echo "copying weights $weights"
    install -m 0644 -o easel -g easel "$weights" /var/lib/easel/vgg19.safetensors.part
    mv -f /var/lib/easel/vgg19.safetensors.part /var/lib/easel/vgg19.safetensors
elif [ "$fetch" = yes ] && [ ! -f /var/lib/easel/vgg19.safetensors ]; then
    echo "downloading pretrained VGG-19 weights (548 MB)"
    /usr/local/bin/easel weights fetch --out /var/lib/easel/vgg19.safetensors
    chown easel:easel /var/lib/easel/vgg19.safetensors
fi
if [ ! -f /var/lib/easel/vgg19.safetensors ]; then
    echo "note: no weights at /var/lib/easel/vgg19.safetensors yet; the service will not start" >&2
    echo "      until you add them (--weights FILE or --fetch-weights)" >&2
fi

if [ ! -f /etc/easel/daemon.toml ]; then
    echo "writing /etc/easel/daemon.toml (from configs/pi.toml on aarch64, else the defaults)"
    {
        echo "# easel daemon config: laid over the built-in defaults (\`easel config show\`)."
        echo "# Changes apply from the next job. Check with: easel config check /etc/easel/daemon.toml"
        if [ "$(uname -m)" = aarch64 ] && [ -f "$repo/configs/pi.toml" ]; then
            cat "$repo/configs/pi.toml"
        fi
        printf '\n# The style of jobs without a sidecar naming one: a file in %s/styles/.\n' "$root"
        printf '#[[style]]\n#path = "starry-night.jpg"\n'
        printf '\n[daemon]\nsettle_ms = 3000\nsidecar_wait_ms = 2000\ncheckpoint_every = 20\n'
        printf 'workers = 1\npoll_ms = 0        # > 0 if %s is on NFS/SMB\nkeep_originals = true\n' "$root"
    } > /etc/easel/daemon.toml
fi

install -D -m 0644 "$here/DAEMON.md" /usr/local/share/doc/easel/DAEMON.md

unit=/etc/systemd/system/easel.service
sed -e "s#/srv/easel#$root#g" "$here/easel.service" > "$unit"
systemctl daemon-reload
systemctl enable easel.service
if [ "$start" = yes ]; then
    systemctl restart easel.service
    echo "started: drop photos into $root/inbox/ (styles in $root/styles/); status in $root/status.json"
    echo "logs: journalctl -u easel -f"
else
    echo "installed; start with: systemctl start easel"
fi
