# The vLLM OpenAI server image with peftdeploy inside: its vLLM plugin (catalog adapters resolved on first
# request, peftdeploy's LoRA kernels), the traffic counter (peftdeploy_requests_total) and the API-key guard
# travel into the cluster. `peftdeploy render --image auto` (the default) uses this image for recipes that
# need the plugin (policy.catalog); pass --image to use your own build.
#
#   docker build -f docker/vllm-peftdeploy.Dockerfile -t peftdeploy/vllm-openai:v0.33.0-peftdeploy0.1.0 .
#
# Build context: this repository (installs the checked-out peftdeploy; no extras: the image has vLLM and torch).
ARG VLLM_IMAGE=vllm/vllm-openai:v0.33.0
FROM ${VLLM_IMAGE}
COPY pyproject.toml README.md /tmp/peftdeploy/
COPY peftdeploy /tmp/peftdeploy/peftdeploy
# (the optional C merge kernel builds if the image has gcc; the server never merges)
RUN pip install --no-cache-dir /tmp/peftdeploy && rm -rf /tmp/peftdeploy \
 && python3 -c "import peftdeploy.vllm_plugin, peftdeploy.vllm_plugin.traffic, peftdeploy.vllm_plugin.guard"
# vLLM loads the plugin through its `vllm.general_plugins` entry point; the recipe comes from PEFTDEPLOY_RECIPE
# (render mounts it at /etc/peftdeploy/recipe.yaml). The base image's entrypoint is kept.
