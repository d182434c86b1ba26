#!/usr/bin/env bash
# A short tour of owfs on a fresh machine: installs what is missing (scripts/install-deps.sh,
# as .ci/run does, so that scripts/test.sh works afterwards), builds the release binary, mounts
# a workspace read-write (SQLite and files through the mount, sync, status, unmount, a second
# mount on an empty cache that sees everything), then walks one workspace (app.db + files/) through snapshot, log, ls, cat, restore, fork,
# rollback, drill and gc on the embedded default store (/var/lib/owfs/store for root, else
# ~/.local/share/owfs/store; OWFS_STORE or --store elsewhere). Each run uses a new workspace
# name (demo-<time>-<pid>), so it can be run again; the scratch directory is removed.
#
# Usage: scripts/demo.sh [--no-install]   (--no-install: skip scripts/install-deps.sh)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
owfs="$root/target/release/owfs"
install=1
[[ ${1:-} == --no-install ]] && install=0

bold=$'\e[1m' dim=$'\e[2m' off=$'\e[0m'
[[ -t 1 ]] || bold='' dim='' off=''

say() { printf '\n%s== %s%s\n' "$bold" "$*" "$off"; }
note() { printf '%s   %s%s\n' "$dim" "$*" "$off"; }
# Shows the command, then runs it.
run() {
    local shown=() a
    for a in "$@"; do
        [[ $a == "$owfs" ]] && a=owfs
        [[ $a == *[[:space:]\;]* ]] && a="'$a'"
        shown+=("$a")
    done
    printf '%s$ %s%s\n' "$bold" "${shown[*]}" "$off"
    "$@"
}

if ((install)); then
    say "Installing what is missing (scripts/install-deps.sh)"
    "$root/scripts/install-deps.sh"
fi
if ! command -v cargo >/dev/null && [[ -x "$HOME/.cargo/bin/cargo" ]]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi

say "Building the release binary (cargo build --release -p owfs)"
(cd "$root" && cargo build --release -p owfs --quiet)
note "$owfs"

scratch=$(mktemp -d "${TMPDIR:-/tmp}/owfs-demo.XXXXXX")
live="$scratch/live"
cleanup() {
    if grep -qs " $live " /proc/mounts; then "$owfs" umount "$live" >/dev/null 2>&1 || umount -l "$live"; fi
    rm -rf "$scratch"
}
trap cleanup EXIT
ws="demo-$(date -u +%Y%m%d-%H%M%S)-$$"
work="$scratch/workspace"
if [[ -n ${OWFS_STORE:-} ]]; then
    store="$OWFS_STORE (from OWFS_STORE)"
elif [[ $(id -u) -eq 0 ]]; then
    store="file:///var/lib/owfs/store (the embedded default for root)"
else
    store="file://${XDG_DATA_HOME:-$HOME/.local/share}/owfs/store (the embedded default)"
fi

say "The main job: mount workspace $ws-live read-write (created on first mount)"
mkdir -p "$live"
run "$owfs" mount "$ws-live" "$live" --cache-dir "$scratch/cache1"
note "programs see a plain directory; every second what changed becomes a generation"
mkdir -p "$live/files"
run sqlite3 "$live/app.db" 'PRAGMA journal_mode=WAL; CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT); INSERT INTO notes(body) VALUES ("written through the mount");'
printf 'a file next to the database\n' >"$live/files/hello.txt"
run "$owfs" sync "$live"
note "sync returned: that generation is durable in the store (fsync of $live does the same)"
run "$owfs" status "$live"
say "One writer: a second node is refused while this one holds the lease"
mkdir -p "$scratch/other"
if "$owfs" mount "$ws-live" "$scratch/other" --cache-dir "$scratch/cache2"; then
    echo "demo: error: a second mount of a held workspace succeeded" >&2
    exit 1
fi
note "(exit 11; --wait waits for the holder, --takeover fences it out)"
run "$owfs" mount --prefetch-only "$ws-live" --cache-dir "$scratch/cache2"
note "the next node pre-pulled the workspace while this one still serves it"
run "$owfs" handoff "$live"
say "Another node: mount the same workspace; it starts at once from the handed-off generation"
run "$owfs" mount "$ws-live" "$live" --cache-dir "$scratch/cache2"
run sqlite3 "$live/app.db" 'PRAGMA integrity_check; SELECT * FROM notes;'
run cat "$live/files/hello.txt"
before=$(date -u +%Y-%m-%dT%H:%M:%S.%3NZ)
sleep 1
run sqlite3 "$live/app.db" 'INSERT INTO notes(body) VALUES ("a second row, a moment later");'
run "$owfs" sync "$live"
say "Time travel: the database as it was at $before, queried in place (nothing restored)"
mkdir -p "$scratch/past"
run "$owfs" mount "$ws-live@$before" "$scratch/past" -o ro
run sqlite3 -readonly "$scratch/past/app.db" 'SELECT * FROM notes;'
run "$owfs" umount "$scratch/past"
note "WS@TIME (UTC) or WS@-5m works wherever a generation is read: ls, cat, restore, fork, drill"
run "$owfs" umount "$live"
run "$owfs" log "$ws-live"

say "A workspace: an SQLite database and plain files"
mkdir -p "$work/files/notes"
sqlite3 "$work/app.db" <<'SQL'
CREATE TABLE tasks(id INTEGER PRIMARY KEY, title TEXT NOT NULL, done INTEGER NOT NULL DEFAULT 0);
INSERT INTO tasks(title) VALUES ('write the brief'), ('build the storage core'), ('mount it');
SQL
printf 'hello from generation 1\n' >"$work/files/hello.txt"
printf '# notes\nowfs keeps every committed state.\n' >"$work/files/notes/README.md"
head -c $((3 << 20)) /dev/urandom >"$work/files/blob.bin"
ln -s notes/README.md "$work/files/latest-note"
note "workspace $ws in $work; store: $store"
(cd "$work" && find . -mindepth 1 | sort | sed 's/^/   /')

say "1. Snapshot: the directory becomes generation 1 (chunked, deduplicated, packed, published)"
run "$owfs" snapshot "$work" "$ws"

say "Change the workspace: a row in the database, a file edited, a file added"
sqlite3 "$work/app.db" "UPDATE tasks SET done = 1 WHERE id <= 2; INSERT INTO tasks(title) VALUES ('hand off');"
printf 'hello from generation 2\n' >"$work/files/hello.txt"
printf 'new in generation 2\n' >"$work/files/notes/todo.txt"
note "app.db: $(sqlite3 "$work/app.db" 'SELECT count(*) FROM tasks') tasks, $(sqlite3 "$work/app.db" 'SELECT count(*) FROM tasks WHERE done') done"

say "2. Snapshot again: only what changed is read and uploaded"
run "$owfs" snapshot "$work" "$ws"

say "3. History"
run "$owfs" log "$ws"

say "4. Browse a generation without restoring it"
run "$owfs" ls -l "$ws" /files
run "$owfs" cat "$ws@1" /files/hello.txt
run "$owfs" cat "$ws@2" /files/hello.txt

say "5. Restore generation 2 and compare it with the workspace"
run "$owfs" restore "$ws@2" "$scratch/restored"
run diff -r "$work" "$scratch/restored"
note "diff -r: identical contents"
meta() { (cd "$1" && find . -mindepth 1 -printf '%p %y %m %s %T@ %l\n' | sort); }
if diff <(meta "$work") <(meta "$scratch/restored") >/dev/null; then
    note "and identical names, types, modes, sizes, mtimes (ns) and symlink targets"
else
    echo "demo: metadata differs after restore:" >&2
    diff <(meta "$work") <(meta "$scratch/restored") >&2 || true
    exit 1
fi
run sqlite3 "$scratch/restored/app.db" 'PRAGMA integrity_check; SELECT id, title, done FROM tasks;'

say "6. Fork generation 1 as a new workspace: O(1), no data copied"
run "$owfs" fork "$ws@1" "$ws-fork"
run "$owfs" cat "$ws-fork" /files/hello.txt

say "7. Roll $ws back to generation 1: a new generation 3 with 1's content; history is kept"
run "$owfs" rollback "$ws" 1
run "$owfs" log "$ws"
run "$owfs" cat "$ws" /files/hello.txt

say "8. Restore drill: verify every byte, restore to scratch, PRAGMA integrity_check on app.db"
run "$owfs" drill "$ws@2"

say "9. Garbage collection, dry run: what a real run would condemn or delete; nothing changes"
run "$owfs" gc --dry-run

say "Done"
note "workspaces $ws and $ws-fork stay in $store"
note "try: $owfs log $ws; $owfs --help"
