#!/usr/bin/env bash
# Downloads every wheel an image installs into a folder of the build context, for offline builds.
#
#   docker/make-wheelhouse.sh cpu|gpu [FOLDER]        (default FOLDER: wheelhouse/<target>)
#   docker build -f docker/Dockerfile --target cpu --build-arg WHEELHOUSE=wheelhouse/cpu .
#
# The wheels are the pins of docker/constraints.txt (build tools, hingeloss's dependencies and
# torch's) built for the image's Python and glibc, not this machine's, and torch in the target's
# build (+cpu, +cu126) with its own dependencies (the CUDA build's nvidia-* wheels). pip's own
# configuration applies (PIP_INDEX_URL, PIP_FIND_LINKS, pip.conf): a mirror, or a folder of
# wheels already on disk, serves as well as PyPI. TORCH_INDEX_URL overrides the PyTorch index of
# the target; set it empty to use only pip's configured sources. PYTHON runs pip (python3).
set -euo pipefail
cd "$(dirname "$0")/.."

target=${1:?usage: $0 cpu|gpu [FOLDER]}
folder=${2:-wheelhouse/$target}
# Per target: the runtime's Python, its glibc (Debian 12: 2.36, Ubuntu 24.04: 2.39), torch's
# local version label and the PyTorch index that serves that build.
case $target in
    cpu) python_version=3.11 glibc_minor=36 torch_label=cpu ;;
    gpu) python_version=3.12 glibc_minor=39 torch_label=cu126 ;;
    *) echo "make-wheelhouse: unknown target $target (cpu or gpu)" >&2; exit 2 ;;
esac
torch_index=${TORCH_INDEX_URL-https://download.pytorch.org/whl/$torch_label}
torch_version=$(sed -n 's/^torch==\([^[:space:]#]*\).*/\1/p' docker/constraints.txt)
[[ -n $torch_version ]] || { echo "make-wheelhouse: no torch pin in docker/constraints.txt" >&2; exit 1; }
torch="torch==${torch_version}+${torch_label}"

# A manylinux wheel for glibc 2.X runs on any newer glibc: accept every tag up to the image's.
platforms=()
for minor in $(seq 17 "$glibc_minor"); do
    platforms+=(--platform "manylinux_2_${minor}_x86_64")
done
platforms+=(--platform manylinux2014_x86_64)

download() {
    "${PYTHON:-python3}" -m pip download --dest "$folder" --only-binary=:all: \
        --python-version "$python_version" --implementation cp \
        --abi "cp${python_version/./}" "${platforms[@]}" "$@"
}

mkdir -p "$folder"
requirements=$(mktemp)
trap 'rm -f "$requirements"' EXIT
sed '/^torch==/d' docker/constraints.txt > "$requirements"
# torch alone from the PyTorch index; then everything else, torch's dependencies included, from
# pip's sources, with torch found in the folder (so that the PyTorch index is asked once only).
download --no-deps ${torch_index:+--extra-index-url "$torch_index"} "$torch"
download --find-links "$folder" -c docker/constraints.txt -r "$requirements" "$torch"
echo "make-wheelhouse: $(find "$folder" -name '*.whl' | wc -l) wheels in $folder ($(du -sh "$folder" | cut -f1))"
