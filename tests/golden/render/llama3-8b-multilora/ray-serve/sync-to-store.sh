#!/bin/sh
# Rendered by peftdeploy for target ray-serve; recipe: support-bots  hash: f838751aa36e8550f5d14a04cb71ab796d996a8057b021a6114660efc1973296
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
