#!/usr/bin/env bash
# PostgreSQL 15 (Debian's) with pgvector built for baseline x86-64, for the sink tests.
#
# pgvector's Makefile compiles with -march=native by default; a vector.so built that way on an
# AVX-512 CPU dies with SIGILL on an AVX2-only one. This builds Debian's pgvector source package
# (`apt-get source`, from the Debian suite that has it, through this machine's own Debian
# mirror and a private apt state) with OPTFLAGS="" against Debian's PostgreSQL 15, stages
# `make install` in a cache folder outside the checkout and copies it into Debian's PostgreSQL
# tree, where the server finds extensions. A second run finds the installed files equal to the
# cached ones and does nothing.
#
# Exit 0: installed (or already installed), or it cannot install here (not root, apt cannot
# reach its mirror): then it says why on stderr and the pgvector sink tests skip with a reason.
# Exit 1: the build itself failed.
set -euo pipefail

PG_MAJOR=15
SOURCE_SUITE=trixie   # the Debian suite whose pgvector source is built (bookworm has none)
PG_CONFIG=/usr/lib/postgresql/$PG_MAJOR/bin/pg_config
CACHE=${EMBEDPIPE_CACHE:-$HOME/.cache/embedpipe}   # as pipeline/runtime/compile_cache.py
PACKAGES=(postgresql-$PG_MAJOR postgresql-server-dev-$PG_MAJOR build-essential)

say() { echo "setup_pgvector: $*" >&2; }
cannot() { say "skipped, the pgvector sink tests will skip: $*"; exit 0; }

# Every file of the staged install tree is in place, byte for byte.
installed() {
    local stage=$1/root f
    [[ -f $1/done ]] || return 1
    while IFS= read -r -d '' f; do
        cmp -s "$stage/$f" "/$f" || return 1
    done < <(cd "$stage" && find . -type f -print0)
}

copy_in() {
    local stage=$1/root f
    while IFS= read -r -d '' f; do
        mkdir -p "$(dirname "/$f")"
        # A new file moved over the old one: a running server keeps the vector.so it mapped.
        cp "$stage/$f" "/$f.embedpipe-new"
        chmod 644 "/$f.embedpipe-new"
        mv -f "/$f.embedpipe-new" "/$f"
    done < <(cd "$stage" && find . -type f -print0)
}

already_installed() {
    local built
    for built in "$CACHE"/pgvector-*-pg$PG_MAJOR; do
        if installed "$built"; then
            say "pgvector $(cat "$built/version") for PostgreSQL $PG_MAJOR already installed ($built)"
            return 0
        fi
    done
    return 1
}

already_installed && exit 0

if [[ $(id -u) != 0 ]]; then
    if [[ -f /usr/share/postgresql/$PG_MAJOR/extension/vector.control &&
          -f /usr/lib/postgresql/$PG_MAJOR/lib/vector.so ]]; then
        say "not root; PostgreSQL $PG_MAJOR has a pgvector, not installed from $CACHE" \
            "(tests/sinks/test_pgvector_build.py checks what it was built for)"
        exit 0
    fi
    cannot "not root, so cannot apt-get install ${PACKAGES[*]} nor install pgvector into /usr;" \
        "run 'make pgvector' as root"
fi

if ! { mkdir -p "$CACHE" && touch "$CACHE/pgvector.lock"; } 2>/dev/null; then
    cannot "cannot write the cache folder $CACHE (set EMBEDPIPE_CACHE)"
fi
exec 9>"$CACHE/pgvector.lock"
flock 9   # two runs at once (make test in two checkouts): the second finds the first's install
already_installed && exit 0

# --- Debian's PostgreSQL and the build tools, when missing ---
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    # The headers of the server's own version where apt still has them (else apt upgrades both).
    server=$(dpkg-query -W -f='${Version}' postgresql-$PG_MAJOR 2>/dev/null || true)
    apt_install() {
        local args=() p
        for p in "${missing[@]}"; do
            if [[ $p == postgresql-server-dev-$PG_MAJOR && -n $server ]] &&
                apt-cache madison "$p" 2>/dev/null | grep -q "| $server |"; then
                p="$p=$server"
            fi
            args+=("$p")
        done
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${args[@]}" \
            >"$CACHE/apt-install.log" 2>&1
    }
    say "apt-get install ${missing[*]}"
    if ! apt_install; then
        apt-get update -q >"$CACHE/apt-update.log" 2>&1 || true
        apt_install ||
            cannot "apt-get install ${missing[*]} failed: $(tail -n 1 "$CACHE/apt-install.log")"
    fi
fi

# A stage copied before (PostgreSQL reinstalled since): no download, no build.
for built in "$CACHE"/pgvector-*-pg$PG_MAJOR; do
    if [[ -f $built/done ]]; then
        copy_in "$built"
        say "pgvector $(cat "$built/version") for PostgreSQL $PG_MAJOR installed from $built"
        exit 0
    fi
done

# --- the source: Debian's pgvector source package, with a private apt state ---
mirror=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 2>/dev/null |
    awk -v suite="$(. /etc/os-release && echo "$VERSION_CODENAME")" '$2 == suite {print $1; exit}')
[[ -n $mirror ]] || cannot "no Debian mirror for this release in apt's sources"
apt_dir=$CACHE/apt-$SOURCE_SUITE
mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/sources.list.d"
echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $SOURCE_SUITE main" \
    >"$apt_dir/sources.list"
apt_opts=(-q -o "Dir::Etc::SourceList=$apt_dir/sources.list"
          -o "Dir::Etc::SourceParts=$apt_dir/sources.list.d" -o "Dir::State::Lists=$apt_dir/lists"
          -o "Dir::Cache=$apt_dir/cache" -o APT::Sandbox::User=root)
if ! apt-get "${apt_opts[@]}" update --error-on=any >"$CACHE/apt-source.log" 2>&1; then
    why=$(grep -m 1 -A 1 -E '^(Err|E|W):' "$CACHE/apt-source.log" | tr -s '\n ' ' ')
    cannot "apt-get update of Debian $SOURCE_SUITE's source index failed: $why"
fi
work=$(mktemp -d "$CACHE/pgvector-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get "${apt_opts[@]}" source pgvector) >>"$CACHE/apt-source.log" 2>&1 ||
    cannot "apt-get source pgvector ($SOURCE_SUITE) failed: $(tail -n 1 "$CACHE/apt-source.log")"
dsc=$(ls "$work"/pgvector_*.dsc)
version=$(basename "$dsc" .dsc); version=${version#pgvector_}
src=$(find "$work" -mindepth 1 -maxdepth 1 -type d -name 'pgvector-*')

# --- build for baseline x86-64 and stage the install ---
# OPTFLAGS="": no -march=native. with_llvm=no: no JIT bitcode (JIT-compiled queries call
# pgvector's functions instead of inlining them).
say "building pgvector $version with OPTFLAGS=\"\" against $($PG_CONFIG --version)"
make_args=(PG_CONFIG="$PG_CONFIG" OPTFLAGS="" with_llvm=no)
if ! { make -C "$src" -j"$(nproc)" "${make_args[@]}" &&
       make -C "$src" "${make_args[@]}" install DESTDIR="$work/root"
     } >"$CACHE/pgvector-build.log" 2>&1; then
    say "building pgvector $version failed; the log: $CACHE/pgvector-build.log"
    exit 1
fi
built=$CACHE/pgvector-$version-pg$PG_MAJOR
rm -rf "$built"
mkdir -p "$built"
mv "$work/root" "$built/root"
cp "$dsc" "$built/"
echo "$version" >"$built/version"
touch "$built/done"
rm -rf "$apt_dir"   # the suite's source index (22 MB): only a new build needs it
copy_in "$built"
say "pgvector $version for PostgreSQL $PG_MAJOR installed (Debian $SOURCE_SUITE source," \
    "OPTFLAGS=\"\"), staged in $built"
