"""JSON Schema for the part of vLLM production-stack's Helm values that `production-stack` renders.

The chart's own values.schema.json ships inside the chart (helm repo
https://vllm-project.github.io/production-stack), not on PyPI or npm, so it is not available to the
test environment. This schema was written by hand from the chart's documented value fields
(servingEngineSpec.modelSpec[*], vllmConfig, loraAdapters[*], loraController, extraObjects) and their
types as the chart documents them. It is deliberately STRICTER than the chart's: unknown keys are
errors here (the chart's schema allows them), so a typo in a field name fails our tests instead of
being ignored by `helm install`. Fields we never emit are listed only where a sibling needs them.
"""
from __future__ import annotations

from typing import Any

_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_SECRET_REF = {
    "type": "object",
    "required": ["secretName", "secretKey"],
    "additionalProperties": False,
    "properties": {"secretName": {"type": "string"}, "secretKey": {"type": "string"}},
}
_ENV = {"type": "array", "items": {"type": "object", "required": ["name"]}}

VLLM_CONFIG: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "convert": {"enum": ["token_embed", "embed", "token_classify", "classify", "score"]},
        "dtype": {"type": "string"},
        "enableChunkedPrefill": {"type": "boolean"},
        "enablePrefixCaching": {"type": "boolean"},
        "extraArgs": {"type": "array", "items": {"type": "string"}},
        "gpuMemoryUtilization": {"type": ["integer", "number", "string"]},
        "maxLoras": {"type": "integer"},
        "maxModelLen": {"type": "integer"},
        "maxNumSeqs": {"type": "integer"},
        "runner": {"enum": ["auto", "pooling"]},
        "tensorParallelSize": {"type": "integer"},
        "v0": {"type": "string"},
    },
}

MODEL_SPEC: dict[str, Any] = {
    "type": "object",
    "required": ["name", "repository", "tag", "modelURL"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string"},
        "annotations": _STR_MAP,
        "labels": _STR_MAP,
        "podAnnotations": _STR_MAP,
        "podLabels": _STR_MAP,
        "repository": {"type": "string"},
        "tag": {"type": "string"},
        "modelURL": {"type": "string"},
        "modelRevision": {"type": "string"},
        "replicaCount": {"type": "integer", "minimum": 0},
        "requestCPU": {"type": "integer"},
        "requestMemory": {"type": "string"},
        "requestGPU": {"type": ["integer", "number", "string"]},
        "requestGPUType": {"type": "string"},
        "limitCPU": {"type": ["integer", "number", "string"]},
        "limitMemory": {"type": "string"},
        "pvcStorage": {"type": "string"},
        "pvcAccessMode": {"type": "array", "items": {"type": "string"}},
        "storageClass": {"type": "string"},
        "shmSize": {"type": "string"},
        "enableLoRA": {"type": "boolean"},
        "env": _ENV,
        "envFromSecret": {"type": "object"},
        "extraVolumes": {"type": "array", "items": {"type": "object", "required": ["name"]}},
        "extraVolumeMounts": {"type": "array", "items": {"type": "object", "required": ["name", "mountPath"]}},
        "hf_token": {"oneOf": [{"type": "string"}, _SECRET_REF]},
        "initContainer": {
            "type": "object",
            "required": ["name", "image"],
            "additionalProperties": False,
            "properties": {
                "name": {"type": "string"},
                "image": {"type": "string"},
                "command": {"type": "array", "items": {"type": "string"}},
                "args": {"type": "array", "items": {"type": "string"}},
                "env": _ENV,
                "resources": {"type": "object"},
                "mountPvcStorage": {"type": "boolean"},
                "extraVolumeMounts": {"type": "array", "items": {"type": "object", "required": ["name", "mountPath"]}},
            },
        },
        "nodeSelectorTerms": {"type": "array"},
        "tolerations": {"type": "array"},
        "runtimeClassName": {"type": "string"},
        "vllmConfig": VLLM_CONFIG,
    },
}

LORA_ADAPTER: dict[str, Any] = {
    "type": "object",
    "required": ["name", "baseModel", "adapterSource"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
        "enabled": {"type": "boolean"},
        "baseModel": {"type": "string"},
        "vllmApiKey": _SECRET_REF,
        "adapterSource": {
            "type": "object",
            "required": ["type", "adapterName"],
            "additionalProperties": False,
            "properties": {
                "type": {"enum": ["local", "s3", "http", "huggingface"]},
                "adapterName": {"type": "string"},
                "adapterPath": {"type": "string"},
                "repository": {"type": "string"},
                "pattern": {"type": "string"},
                "maxAdapters": {"type": "integer"},
                "credentials": {"oneOf": [{"type": "string"}, _SECRET_REF]},
            },
            "allOf": [
                {"if": {"properties": {"type": {"const": "huggingface"}}}, "then": {"required": ["repository"]}},
                {"if": {"properties": {"type": {"const": "s3"}}}, "then": {"required": ["adapterPath"]}},
            ],
        },
        "loraAdapterDeploymentConfig": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "algorithm": {"enum": ["default", "ordered", "equalized"]},
                "replicas": {"type": "integer", "minimum": 1},
                "labels": _STR_MAP,
            },
        },
    },
}

VALUES_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "vllm-stack Helm values (subset rendered by peftdeploy)",
    "type": "object",
    "required": ["servingEngineSpec"],
    "additionalProperties": False,
    "properties": {
        "servingEngineSpec": {
            "type": "object",
            "required": ["modelSpec"],
            "additionalProperties": False,
            "properties": {
                "enableEngine": {"type": "boolean"},
                "modelSpec": {"type": "array", "minItems": 1, "items": MODEL_SPEC},
                "vllmApiKey": {"oneOf": [{"type": "string"}, _SECRET_REF]},
                "runtimeClassName": {"type": "string"},
            },
        },
        "loraController": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"enableLoraController": {"type": "boolean"}},
        },
        "loraAdapters": {"type": "array", "items": LORA_ADAPTER},
        "extraObjects": {"type": "array", "items": {"type": "object", "required": ["apiVersion", "kind", "metadata"]}},
    },
}
