#!/usr/bin/env bash
# Installs pgvector 0.8 into the host's PostgreSQL server from Debian trixie's source
# package (Debian 12 ships no pgvector). Idempotent: does nothing when the extension is there.
set -euo pipefail
PGVER=$(ls /etc/postgresql | sort -n | tail -n 1)
if [ -f "/usr/share/postgresql/$PGVER/extension/vector.control" ]; then
  echo "pgvector already installed for PostgreSQL $PGVER"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
LIST=/etc/apt/sources.list.d/trixie-src.list
if [ ! -f "$LIST" ]; then
  # Reuse the mirror the host's apt already uses for Debian's main archive.
  MIRROR=$(grep -h -m1 -E '^URIs: .*/debian$' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}')
  [ -n "$MIRROR" ] || MIRROR=$(grep -h -m1 -oE '^deb [^ ]+/debian ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}')
  echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR trixie main" > "$LIST"
fi
apt-get update -qq
apt-get install -y -qq --no-install-recommends "postgresql-server-dev-$PGVER" dpkg-dev make gcc >/dev/null
BUILD=$(mktemp -d)
cd "$BUILD"
apt-get source -qq pgvector >/dev/null 2>&1 || apt-get source pgvector
cd pgvector-*/
make OPTFLAGS="" PG_CONFIG="/usr/lib/postgresql/$PGVER/bin/pg_config" >/dev/null
make OPTFLAGS="" PG_CONFIG="/usr/lib/postgresql/$PGVER/bin/pg_config" install >/dev/null
echo "pgvector $(grep default_version vector.control) installed for PostgreSQL $PGVER"
