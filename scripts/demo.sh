#!/usr/bin/env bash
# `make demo`: train LeNet-300-100 on the embedded digits data and report its accuracy.
set -euo pipefail
out=${DEMO_OUT:-demo-out}
mkdir -p "$out"
dcomp train --arch lenet-300-100 --data digits --epochs 20 -o "$out/base.pt"
dcomp eval "$out/base.pt" --data digits
