#!/bin/sh
# Rendered by peftdeploy for target ray-serve; recipe: support-bots  hash: 2c311555919fb69f840137d3e78de3dbaf9c04be04f554c414cb73e6b91598c6
# Copy what support-bots's Ray Serve config loads into s3://acme-models/ray-serve (run once per recipe change).
# Credentials come from your environment (HF_TOKEN, AWS_*); none are written here.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
hf download acme-ai/llama3-8b-billing-lora --revision main --local-dir "$work/billing"
aws s3 sync "$work/billing" s3://acme-models/ray-serve/adapters/billing
hf download acme-ai/llama3-8b-refunds-lora --revision main --local-dir "$work/refunds"
aws s3 sync "$work/refunds" s3://acme-models/ray-serve/adapters/refunds
hf download acme-ai/llama3-8b-shipping-lora --revision main --local-dir "$work/shipping"
aws s3 sync "$work/shipping" s3://acme-models/ray-serve/adapters/shipping
aws s3 sync s3://acme-models/adapters/tone-formal s3://acme-models/ray-serve/adapters/tone-formal
