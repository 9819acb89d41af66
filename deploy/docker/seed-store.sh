#!/bin/sh
# seed-store.sh SRC DST: copy the image's demo store SRC into an EMPTY model store DST.
#
# Used by the Kubernetes init container (a fresh PersistentVolume starts empty; Docker named
# volumes are seeded by Docker itself). A store that already lists anything is left alone, so
# real models are never overwritten. Each model is copied to a hidden directory (the store
# ignores hidden entries) and renamed into place: a rename is atomic, so a server or a second pod
# seeding at the same time never sees half a model, and the loser of a race just drops its copy.
set -eu
src=${1:?usage: seed-store.sh SRC DST}
dst=${2:?usage: seed-store.sh SRC DST}
if [ -n "$(ls "$dst")" ]; then
    echo "seed-store: $dst is not empty, leaving it alone"
    exit 0
fi
tmp=$(mktemp -d "$dst/.seed-XXXXXX")
trap 'rm -rf "$tmp"' EXIT
count=0
for model in "$src"/*/; do
    name=$(basename "$model")
    cp -a "$model" "$tmp/$name"
    if mv -T "$tmp/$name" "$dst/$name" 2>/dev/null; then
        count=$((count + 1))
    fi
done
echo "seed-store: seeded $count model(s) from $src into $dst"
