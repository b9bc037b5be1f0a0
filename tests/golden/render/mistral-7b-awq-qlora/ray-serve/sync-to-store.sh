#!/bin/sh
# Rendered by peftdeploy for target ray-serve; recipe: field-notes-awq  hash: acc19868f20184c80eb209a1a7c631df47731bce2e997455ba41b71756304932
# Copy what field-notes-awq's Ray Serve config loads into s3://acme-models/ray-serve (run once per recipe change).
# Credentials come from your environment (HF_TOKEN, AWS_*); none are written here.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
hf download acme-ai/mistral-7b-field-notes-qlora --local-dir "$work/field-notes"
aws s3 sync "$work/field-notes" s3://acme-models/ray-serve/adapters/field-notes
hf download acme-ai/mistral-7b-summaries-qlora --local-dir "$work/summaries"
aws s3 sync "$work/summaries" s3://acme-models/ray-serve/adapters/summaries
