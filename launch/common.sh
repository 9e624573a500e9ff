# Shared by the launch scripts: `run CMD...` prints the command (shell-quoted, prefixed with "+ ")
# and runs it unless DRY_RUN=1, so every script has a dry-run mode that shows exactly what it does.
run() {
  printf '+'; printf ' %q' "$@"; printf '\n'
  if [[ "${DRY_RUN:-0}" != 1 ]]; then "$@"; fi
}
