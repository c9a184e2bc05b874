# check_int NAME MIN MAX [WHY]: the variable NAME must hold an integer from MIN to MAX (one `error:`
# line and exit 2 otherwise); it is rewritten without leading zeros. Sourced by the launch scripts.
check_int() {
  local name=$1 min=$2 max=$3 why=${4:-} value=${!1} digits
  digits=$(printf '%s' "$value" | sed 's/^0*//')
  digits=${digits:-0}
  if ! [[ "$value" =~ ^[0-9]+$ ]] || [ "${#digits}" -gt 9 ] || [ "$digits" -lt "$min" ] || [ "$digits" -gt "$max" ]; then
    echo "error: $name=$value must be an integer from $min to $max${why:+ ($why)}" >&2
    exit 2
  fi
  printf -v "$name" '%s' "$digits"  # without leading zeros (08 is not octal to anyone after this)
}
