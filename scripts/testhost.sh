#!/usr/bin/env bash
# Prepares this machine (Debian 12, as root, no systemd as PID 1) for virtwarden's tests and
# demo: Debian packages, the Python deps, the main libvirtd, a second libvirtd ("host2", for
# migration and multi-host tests), Redis, PostgreSQL and a moto S3 server. The facts behind each step are
# in shared/libvirt-test-host.md.
#
# Usage: scripts/testhost.sh [install | start | status | stop [--all]]   (default: install, start)
#
# Idempotent and fast on a ready machine: every step checks first and does nothing when its
# work is already done. `stop` stops what this script starts for tests (host2, moto); `stop
# --all` also stops the main libvirtd/virtlogd, and Redis if this script started it.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=/var/lib/virtwarden-testhost
LOGS=/var/log/virtwarden-testhost
H2=$STATE/host2
MAIN_URI=qemu:///system
H2_PORT=16510
H2_URI=qemu+tcp://127.0.0.1:$H2_PORT/system
REDIS_PORT=6379
S3_PORT=9900
PG_PORT=5432
PG_URL=postgresql+psycopg2://virtwarden:virtwarden@127.0.0.1:$PG_PORT/virtwarden_test
export DEBIAN_FRONTEND=noninteractive

# gcc: libvirt-python builds from source against libvirt-dev.
# e2fsprogs: the agent guest's ext4 disk is made (mkfs.ext4) and checked (e2fsck) by the tests.
# faketime: fault tests run a worker whose clock is ahead or behind (libfaketime).
# systemd: systemd-analyze, with which tests/test_deploy.py measures the units' exposure.
APT_PACKAGES=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86
              qemu-utils libvirt-dev pkg-config gcc e2fsprogs faketime systemd
              iptables  # libvirt starts its networks (the isolated drill network) through iptables
              tini      # reaps QEMU processes at once: see start_libvirtd
              docker-compose   # validates compose.yaml (`config` needs no Docker daemon)
              prometheus       # promtool checks deploy/prometheus/rules.yml; a test's own server fires them
              prometheus-alertmanager  # amtool checks, and a test's own Alertmanager runs, alertmanager.yml
              virtnbdbackup    # the peer bench/ measures against (make bench); brings python3-libnbd
              chromium)        # the dashboard's test drives it (Playwright, no browser download)

say() { echo "testhost: $*"; }
die() { echo "testhost: error: $*" >&2; exit 1; }

# wait_until SECONDS WHAT COMMAND... : poll COMMAND until it succeeds.
wait_until() {
    local limit=$1 what=$2 deadline=$((SECONDS + $1))
    shift 2
    until "$@"; do
        ((SECONDS < deadline)) || die "$what did not answer within ${limit}s"
        sleep 0.2
    done
}

# Service probes talk the protocol over bash's /dev/tcp, so they need no client installed.
libvirt_ok() { timeout 10 virsh -c "$1" version >/dev/null 2>&1; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
redis_ok() {
    (exec 3<>"/dev/tcp/127.0.0.1/$REDIS_PORT" && printf 'PING\r\n' >&3 &&
        read -r -t 3 reply <&3 && [[ $reply == +PONG* ]]) 2>/dev/null
}
s3_ok() {
    (exec 3<>"/dev/tcp/127.0.0.1/$S3_PORT" &&
        printf 'GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3 &&
        read -r -t 3 status <&3 && [[ $status == HTTP/1.?\ 200* ]]) 2>/dev/null
}

# pid_alive FILE PATTERN: the pid in FILE runs and its command line matches PATTERN (so a
# stale pid file whose number was reused by another program does not count).
pid_alive() {
    local pid cmd
    [[ -s $1 ]] || return 1
    pid=$(<"$1")
    cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
    [[ $cmd == *"$2"* ]]
}

# stop_pid NAME FILE PATTERN: TERM, wait up to 10 s, then KILL.
stop_pid() {
    local pid
    if pid_alive "$2" "$3"; then
        pid=$(<"$2")
        say "stopping $1 (pid $pid)"
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
    fi
    rm -f "$2"
}

# --- Python ---------------------------------------------------------------------------------
# Debian's own python3 refuses `pip install` outside a venv (PEP 668, EXTERNALLY-MANAGED), and
# may lack pip altogether: then the project lives in .venv, which the Makefile prefers too.
pick_python() {
    NEED_VENV=0
    if [[ -x $REPO/.venv/bin/python ]]; then
        PY=$REPO/.venv/bin/python
        return
    fi
    PY=python3
    if ! python3 -m pip --version >/dev/null 2>&1 || python3 -c '
import os, sys, sysconfig
marker = os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")
sys.exit(0 if sys.prefix == sys.base_prefix and os.path.exists(marker) else 1)'; then
        NEED_VENV=1
    fi
}

# True when the Python that runs the tests is Debian's own. Its `python -m venv` needs
# python3-venv (pip for the new venv) and building libvirt-python needs python3-dev, for .venv
# and for the clean install that tests/test_install.py makes in an empty venv on every run.
debian_python() {
    local base
    base=$("$PY" -c 'import sys; print(getattr(sys, "_base_executable", sys.executable))' 2>/dev/null) ||
        return 1
    dpkg -S "$(readlink -f "$base")" >/dev/null 2>&1
}

# True when virtwarden is installed editable from THIS checkout (CI installs from its own
# clone) and every requirement in pyproject.toml, [test] extra included, is satisfied.
python_deps_ok() {
    # From /, so that the checkout's own *.egg-info (cwd on sys.path) is not what is found.
    (cd / && "$PY" - "$REPO") <<'EOF' 2>/dev/null
import json, sys, tomllib
from importlib import metadata
from pathlib import Path
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement

repo = Path(sys.argv[1])
project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]

def satisfied(text, extra=""):
    req = Requirement(text)
    if req.marker and not req.marker.evaluate({"extra": extra}):
        return True
    try:
        dist = metadata.distribution(req.name)
    except metadata.PackageNotFoundError:
        return False
    return req.specifier.contains(dist.version, prereleases=True) and all(
        satisfied(r, e) for e in req.extras for r in dist.requires or [])

own = json.loads(metadata.distribution(project["name"]).read_text("direct_url.json") or "{}")
reqs = project["dependencies"] + project["optional-dependencies"]["test"]
sys.exit(0 if own.get("url") == repo.as_uri() and all(map(satisfied, reqs)) else 1)
EOF
}

# --- install --------------------------------------------------------------------------------
do_install() {
    pick_python
    local wanted=("${APT_PACKAGES[@]}") missing=() p
    if ((NEED_VENV)) || debian_python; then wanted+=(python3-venv python3-dev); fi
    # redis-server: also for the fault tests' private brokers, which they stop and start.
    command -v redis-server >/dev/null || wanted+=(redis-server)
    # PostgreSQL: the fleet catalog's tests; installed only where none listens already.
    if ! port_open "$PG_PORT" && ! compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null; then
        wanted+=(postgresql)
    fi
    for p in "${wanted[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if ((${#missing[@]})); then
        say "apt: installing ${missing[*]}"
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}"
        # The tests start their own Prometheus and Alertmanager; the packages' services are
        # not ours to leave running.
        if [[ -d /run/systemd/system ]]; then
            for unit in prometheus prometheus-alertmanager; do
                if [[ " ${missing[*]} " == *" $unit "* ]]; then
                    systemctl disable --now "$unit" >/dev/null 2>&1 || true
                fi
            done
        fi
    else
        say "apt: packages present"
    fi

    if ((NEED_VENV)); then
        say "python: $(command -v python3) is externally managed (PEP 668): creating .venv"
        python3 -m venv "$REPO/.venv"
        PY=$REPO/.venv/bin/python
        "$PY" -m pip install -q --root-user-action=ignore --upgrade pip
    fi
    if python_deps_ok; then
        say "python: virtwarden[test] installed ($PY)"
    else
        say "python: pip install -e '.[test]' ($PY)"
        (cd "$REPO" && "$PY" -m pip install -q --root-user-action=ignore -e '.[test]')
    fi
    build_agent_guest
}

# --- the agent guest ------------------------------------------------------------------------
# A real Linux guest for the quiesce tests (tests/agentguest.py): a Debian cloud kernel and a
# small initramfs (busybox, qemu-ga and its libraries, the virtio modules), built from Debian
# packages only and cached in $AGENT_GUEST. It boots under TCG in a few seconds, mounts the ext4
# filesystem the test put on /dev/vda and runs qemu-ga on the virtio port, logging verbosely to
# the serial console. Bump AGENT_GUEST_RECIPE whenever the recipe changes: every machine rebuilds.
AGENT_GUEST=$STATE/agent-guest
AGENT_GUEST_RECIPE=1
AGENT_GUEST_MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk
                     virtio_console)

# /init of the guest. Writeback happens only when something asks for it (sync, a filesystem
# freeze): data a test writes stays in the guest's page cache until then, so a backup holds
# it only if the freeze really happened. qemu-ga runs as a child (PID 1 ignores SIGSTOP, and
# the tests stop the agent to make it unresponsive).
agent_guest_init() {
    cat <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
say() { echo "vw-guest: $*" >/dev/ttyS0; }
for m in MODULES; do insmod "/lib/modules/$m.ko" || say "insmod $m failed"; done
echo 0 >/proc/sys/vm/dirty_writeback_centisecs
echo 8640000 >/proc/sys/vm/dirty_expire_centisecs
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
mount -t ext4 -o commit=3600,noauto_da_alloc /dev/vda /mnt || say "cannot mount /dev/vda"
port=
i=0
while [ -z "$port" ] && [ $i -lt 100 ]; do
    for d in /sys/class/virtio-ports/*; do
        [ "$(cat "$d/name" 2>/dev/null)" = org.qemu.guest_agent.0 ] && port=/dev/${d##*/}
    done
    [ -n "$port" ] && [ -c "$port" ] || { port=; sleep 0.1; i=$((i + 1)); }
done
[ -n "$port" ] || say "no org.qemu.guest_agent.0 port"
say "ready (agent on $port)"
qemu-ga -m virtio-serial -p "$port" -l /dev/ttyS0 -v -F/etc/fsfreeze-hook &
echo $! >/run/qemu-ga.child
while :; do sleep 3600; done
EOF
}

# Called by qemu-ga before a freeze and after a thaw. A test makes the agent hang inside a
# freeze request by writing a number of seconds to /run/freeze-stall (used once).
agent_guest_hook() {
    cat <<'EOF'
#!/bin/sh
echo "vw-hook: $1" >/dev/ttyS0
if [ "$1" = freeze ] && [ -s /run/freeze-stall ]; then
    stall=$(cat /run/freeze-stall)
    rm -f /run/freeze-stall
    echo "vw-hook: stalling ${stall}s" >/dev/ttyS0
    sleep "$stall"
fi
exit 0
EOF
}

# The kernel package linux-image-cloud-amd64 currently depends on (empty without package lists).
agent_guest_kernel() {
    { apt-cache depends linux-image-cloud-amd64 2>/dev/null || true; } |
        awk '/Depends: linux-image-/ && !found {print $2; found = 1}'
}

build_agent_guest() {
    if [[ -s $AGENT_GUEST/vmlinuz && -s $AGENT_GUEST/initrd.gz &&
          $(head -n 1 "$AGENT_GUEST/recipe" 2>/dev/null) == "recipe $AGENT_GUEST_RECIPE" ]]; then
        say "agent guest: built ($AGENT_GUEST: $(sed -n 2p "$AGENT_GUEST/recipe"))"
        return
    fi
    local kpkg work x root kver m found lib libs
    kpkg=$(agent_guest_kernel)
    if [[ -z $kpkg ]]; then
        apt-get update -qq  # no package lists yet
        kpkg=$(agent_guest_kernel)
    fi
    [[ -n $kpkg ]] || die "agent guest: apt knows no linux-image-cloud-amd64 kernel"
    say "agent guest: building from $kpkg, busybox-static and qemu-guest-agent"
    work=$(mktemp -d /tmp/virtwarden-agent-guest.XXXXXX)
    trap 'rm -rf "$work"' EXIT
    x=$work/x root=$work/root kver=${kpkg#linux-image-}
    local get=(apt-get -qq -o APT::Sandbox::User=root download "$kpkg" busybox-static qemu-guest-agent)
    if ! (cd "$work" && "${get[@]}" >/dev/null); then
        apt-get update -qq  # package lists older than the archive: the versions they name are gone
        (cd "$work" && "${get[@]}" >/dev/null) || die "agent guest: apt-get download failed"
    fi
    for m in "$work"/*.deb; do dpkg-deb -x "$m" "$x"; done
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,run,mnt,tmp,etc,var,lib/modules}
    ln -s ../run "$root/var/run"
    cp "$x/bin/busybox" "$root/bin/busybox"
    cp "$x/usr/sbin/qemu-ga" "$root/usr/sbin/qemu-ga"
    # The libraries qemu-ga links, as this host (the same Debian release) resolves them.
    libs=$(ldd "$x/usr/sbin/qemu-ga")
    if [[ $libs == *"not found"* ]]; then
        die "agent guest: qemu-ga needs libraries this host lacks: $(grep 'not found' <<<"$libs" | tr -s ' \n\t' ' ')"
    fi
    for lib in $(awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' <<<"$libs"); do
        cp -L --parents "$lib" "$root"
    done
    for m in "${AGENT_GUEST_MODULES[@]}"; do
        found=$(find "$x/lib/modules/$kver" -name "$m.ko" -print -quit)
        [[ -n $found ]] || die "agent guest: $kpkg has no module $m.ko"
        cp "$found" "$root/lib/modules/"
    done
    agent_guest_init | sed "s/MODULES/${AGENT_GUEST_MODULES[*]}/" >"$root/init"
    agent_guest_hook >"$root/etc/fsfreeze-hook"
    chmod 755 "$root/init" "$root/etc/fsfreeze-hook"
    # busybox (from the package above) packs the initramfs: no cpio needed on the host.
    (cd "$root" && find . | "$x/bin/busybox" cpio -o -H newc 2>/dev/null) | gzip -9 >"$work/initrd.gz"
    mkdir -p "$AGENT_GUEST"
    rm -f "$AGENT_GUEST/recipe"
    cp "$x/boot/vmlinuz-$kver" "$AGENT_GUEST/vmlinuz.tmp"
    cp "$work/initrd.gz" "$AGENT_GUEST/initrd.gz.tmp"
    mv "$AGENT_GUEST/vmlinuz.tmp" "$AGENT_GUEST/vmlinuz"
    mv "$AGENT_GUEST/initrd.gz.tmp" "$AGENT_GUEST/initrd.gz"
    printf 'recipe %s\n%s, qemu-guest-agent %s\n' "$AGENT_GUEST_RECIPE" "$kpkg" \
        "$(dpkg-deb -f "$work"/qemu-guest-agent_*.deb Version)" >"$AGENT_GUEST/recipe"
    rm -rf "$work"
    trap - EXIT
    say "agent guest: built in $AGENT_GUEST"
}

# --- start ----------------------------------------------------------------------------------
prepare_libvirt() {
    id -u libvirt-qemu >/dev/null 2>&1 || { say "adding user libvirt-qemu"; useradd -r -s /usr/sbin/nologin libvirt-qemu; }
    getent group kvm >/dev/null || { say "adding group kvm"; groupadd -r kvm; }
    # QEMU runs as root without a security driver, so guests can open disk images anywhere
    # (pytest's tmp dirs) with no relabelling; Debian ships no qemu.conf here.
    local want=$'user = "root"\ngroup = "root"\nsecurity_driver = "none"'
    if [[ "$(cat /etc/libvirt/qemu.conf 2>/dev/null)" != "$want" ]]; then
        say "writing /etc/libvirt/qemu.conf"
        mkdir -p /etc/libvirt
        printf '%s\n' "$want" >/etc/libvirt/qemu.conf
        libvirt_ok "$MAIN_URI" && say "note: restart libvirtd (stop --all, start) to apply qemu.conf"
    fi
    mkdir -p /var/log/libvirt /var/run/libvirt /var/lib/libvirt /var/cache/libvirt "$STATE" "$LOGS"
}

# start_libvirtd LOG ARGS...: libvirtd in the foreground of its own session, under
# `tini -s`. QEMU is double-forked, so its process is adopted by the nearest subreaper,
# and libvirt's destroy waits until that one has reaped it. systemd reaps at once; the
# init of a container may reap once a second, and every guest that stops then costs
# over a second (hundreds in the suite). tini, a subreaper, reaps it at once. libvirtd
# writes its own pid file; when it exits tini does too.
start_libvirtd() {
    local log=$1
    shift
    setsid tini -s -- libvirtd "$@" >>"$log" 2>&1 </dev/null &
}

start_main_libvirtd() {
    if libvirt_ok "$MAIN_URI"; then
        say "libvirtd $MAIN_URI: running"
        return
    fi
    pid_alive /run/virtlogd.pid virtlogd || { say "starting virtlogd"; virtlogd -d; }
    if pid_alive /run/libvirtd.pid libvirtd; then
        say "libvirtd is running but does not answer yet: waiting"
    else
        say "starting libvirtd"
        start_libvirtd "$LOGS/libvirtd.log"
    fi
    wait_until 30 "libvirtd $MAIN_URI" libvirt_ok "$MAIN_URI"
    say "libvirtd $MAIN_URI: answering"
}

# The second host: its own mount namespace where private dirs cover libvirt's state, config,
# log and cache dirs, a different host UUID (libvirt refuses to migrate to a host with the
# same one) and TCP on loopback. Disk paths stay shared with the main host, as shared storage.
start_host2() {
    if libvirt_ok "$H2_URI"; then
        say "host2 $H2_URI: running"
        return
    fi
    # A half-started or hung libvirtd holds the pid file and the port. A running virtlogd
    # stays, as on a real host: it holds the log pipes of guests that still run, and
    # qemu-io reports through them.
    stop_pid "host2 libvirtd" "$H2/libvirtd.pid" libvirtd
    local logd=1 keep=qemu
    if pid_alive "$H2/virtlogd.pid" virtlogd && [[ -S $H2/run/virtlogd-sock ]]; then
        logd=0 keep="qemu virtlogd-sock virtlogd-admin-sock"
    else
        stop_pid "host2 virtlogd" "$H2/virtlogd.pid" virtlogd
    fi
    port_open "$H2_PORT" && die "port $H2_PORT is taken by something else"
    say "preparing host2 state in $H2"
    mkdir -p "$H2"/{run,lib,etc/qemu,log,cache}
    # Keep run/qemu: it holds the state of guests that still run, and a restarted libvirtd
    # reattaches to them (and to a backup job one of them runs) as it does on a real host.
    # The sockets of a virtlogd that stays stay too.
    local name args=()
    for name in $keep; do args+=(! -name "$name"); done
    find "$H2/run" -mindepth 1 -maxdepth 1 "${args[@]}" -exec rm -rf {} +
    # The main host's configuration, but not its domain definitions (etc/qemu is host2's own).
    find /etc/libvirt -mindepth 1 -maxdepth 1 ! -name qemu ! -name libvirtd.conf \
        -exec cp -a {} "$H2/etc/" \;
    [[ -s $H2/host_uuid ]] || cat /proc/sys/kernel/random/uuid >"$H2/host_uuid"
    {
        grep -vE '^\s*(listen_tcp|listen_tls|tcp_port|listen_addr|auth_tcp|host_uuid)\s*=' \
            /etc/libvirt/libvirtd.conf 2>/dev/null || true
        printf 'listen_tcp = 1\nlisten_tls = 0\ntcp_port = "%s"\nlisten_addr = "127.0.0.1"\n' "$H2_PORT"
        printf 'auth_tcp = "none"\nhost_uuid = "%s"\n' "$(<"$H2/host_uuid")"
    } >"$H2/etc/libvirtd.conf"
    say "starting host2 libvirtd (private mount namespace)"
    # Own pid files: the default ones (/run/*.pid) lie outside the private dirs and would clash.
    unshare -m --propagation private sh -euc '
        mount --bind "$1/run" /var/run/libvirt
        mount --bind "$1/lib" /var/lib/libvirt
        mount --bind "$1/etc" /etc/libvirt
        mount --bind "$1/log" /var/log/libvirt
        mount --bind "$1/cache" /var/cache/libvirt
        [ "$2" = 0 ] || virtlogd -d -p "$1/virtlogd.pid"
        setsid tini -s -- libvirtd --listen -p "$1/libvirtd.pid" >>"$3" 2>&1 </dev/null &' \
        sh "$H2" "$logd" "$LOGS/host2-libvirtd.log"
    wait_until 60 "host2 $H2_URI" libvirt_ok "$H2_URI"
    say "host2 $H2_URI: answering"
}

start_redis() {
    if redis_ok; then
        say "redis 127.0.0.1:$REDIS_PORT: running"
        return
    fi
    port_open "$REDIS_PORT" && die "port $REDIS_PORT is taken by something that is not Redis"
    say "starting redis-server on 127.0.0.1:$REDIS_PORT"
    redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save '' --appendonly no \
        --pidfile "$STATE/redis.pid" --logfile "$LOGS/redis.log"
    wait_until 10 "redis" redis_ok
}

start_s3() {
    if s3_ok; then
        say "s3 (moto) http://127.0.0.1:$S3_PORT: running"
        return
    fi
    port_open "$S3_PORT" && die "port $S3_PORT is taken by something that is not an S3 endpoint"
    say "starting moto_server on 127.0.0.1:$S3_PORT (log $LOGS/moto.log)"
    # `python -m moto.server` is moto_server from the same environment as the tests.
    setsid nohup "$PY" -m moto.server -H 127.0.0.1 -p "$S3_PORT" >"$LOGS/moto.log" 2>&1 </dev/null &
    echo $! >"$STATE/moto.pid"
    wait_until 30 "moto_server" s3_ok
}

start_postgres() {
    if ! port_open "$PG_PORT"; then
        local version
        version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
        [[ -n $version ]] || die "PostgreSQL is not installed (run: $0 install)"
        say "starting PostgreSQL $version cluster 'main'"
        pg_ctlcluster --skip-systemctl-redirect "$version" main start
        wait_until 30 "postgresql" port_open "$PG_PORT"
    fi
    # A role and database of our own, reached with a password over TCP, so the same URL
    # works under the distribution's default authentication and under trust alike.
    local psql=(runuser -u postgres -- psql -qAtX -v ON_ERROR_STOP=1)
    if [[ $("${psql[@]}" -c "SELECT 1 FROM pg_roles WHERE rolname='virtwarden'") != 1 ]]; then
        "${psql[@]}" -c "CREATE ROLE virtwarden LOGIN PASSWORD 'virtwarden'"
    fi
    if [[ $("${psql[@]}" -c "SELECT 1 FROM pg_database WHERE datname='virtwarden_test'") != 1 ]]; then
        "${psql[@]}" -c "CREATE DATABASE virtwarden_test OWNER virtwarden"
    fi
    say "postgresql 127.0.0.1:$PG_PORT: running (database virtwarden_test)"
}

write_env() {
    local env=$REPO/.testhost/env
    mkdir -p "$REPO/.testhost"
    cat >"$env.tmp" <<EOF
# Written by scripts/testhost.sh start: the services the tests use.
export VIRTWARDEN_TEST_S3_ENDPOINT=http://127.0.0.1:$S3_PORT
export VIRTWARDEN_TEST_HOST2_URI=$H2_URI
export VIRTWARDEN_TEST_REDIS_URL=redis://127.0.0.1:$REDIS_PORT/15
export VIRTWARDEN_TEST_POSTGRES_URL=$PG_URL
EOF
    mv "$env.tmp" "$env"
    say "wrote $env"
}

do_start() {
    pick_python
    prepare_libvirt
    start_main_libvirtd
    start_host2
    start_redis
    start_postgres
    start_s3
    write_env
}

# --- status / stop ----------------------------------------------------------------------------
do_status() {
    pick_python
    local bad=0
    line() { if "${@:3}"; then printf '%-8s %-36s ok\n' "$1" "$2"; else printf '%-8s %-36s missing\n' "$1" "$2"; bad=1; fi; }
    line libvirtd "$MAIN_URI" libvirt_ok "$MAIN_URI"
    line host2 "$H2_URI" libvirt_ok "$H2_URI"
    line redis "127.0.0.1:$REDIS_PORT" redis_ok
    line postgres "127.0.0.1:$PG_PORT" port_open "$PG_PORT"
    line s3 "http://127.0.0.1:$S3_PORT (moto)" s3_ok
    line python "virtwarden[test] ($PY)" python_deps_ok
    return $bad
}

stop_host2_daemons() {
    stop_pid "host2 libvirtd" "$H2/libvirtd.pid" libvirtd
    stop_pid "host2 virtlogd" "$H2/virtlogd.pid" virtlogd
}

do_stop() {
    local dom
    if libvirt_ok "$H2_URI"; then
        # Guests left on host2 would outlive its libvirtd as orphaned QEMU processes.
        for dom in $(virsh -c "$H2_URI" list --name); do
            say "destroying host2 guest $dom"
            virsh -c "$H2_URI" destroy "$dom" >/dev/null
        done
    fi
    stop_host2_daemons
    stop_pid "moto_server" "$STATE/moto.pid" moto
    if [[ ${1:-} == --all ]]; then
        # Guests on the main host keep running; libvirtd reattaches to them when it starts.
        stop_pid "libvirtd" /run/libvirtd.pid libvirtd
        stop_pid "virtlogd" /run/virtlogd.pid virtlogd
        stop_pid "redis-server (started by this script)" "$STATE/redis.pid" redis-server
    fi
}

case "${1:-}" in
    "") do_install; do_start ;;
    install) do_install ;;
    start) do_start ;;
    status) do_status ;;
    stop) do_stop "${2:-}" ;;
    *) die "usage: $0 [install|start|status|stop [--all]]" ;;
esac
