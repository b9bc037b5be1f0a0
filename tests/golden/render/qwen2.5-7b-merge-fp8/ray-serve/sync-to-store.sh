#!/bin/sh
# Rendered by peftdeploy for target ray-serve; recipe: contracts-qwen-fp8  hash: a3c53a30b285e6bb5baa3346291232ffffdb5d893defa46601f6d9ff2a5ed879
# Copy what contracts-qwen-fp8's Ray Serve config loads into s3://acme-models/ray-serve (run once per recipe change).
# Credentials come from your environment (HF_TOKEN, AWS_*); none are written here.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# merge in full precision (needs: pip install 'peftdeploy[merge]'; recipe.yaml is beside this file)
peftdeploy merge "$here/recipe.yaml"
aws s3 sync "$here/merged" s3://acme-models/ray-serve/models/contracts-qwen-fp8-997744831ef053e3
