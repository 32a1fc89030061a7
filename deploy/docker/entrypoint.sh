#!/bin/sh
# Container entry point of the specserve images.
#   serve   [args]  engine + gateway in one container (`specserve serve`), on $SPECSERVE_PORT (8000)
#   engine  [args]  one vLLM OpenAI server with the specserve plugin, on $SPECSERVE_ENGINE_PORT (8100);
#                   every route but /health and /metrics needs $SPECSERVE_ENGINE_API_KEY when set
#   gateway [args]  the gateway alone (`specserve gateway ...`), on $SPECSERVE_PORT (8000)
#   anything else   run as given
# The model is $SPECSERVE_MODEL, or the demo model shipped in the package when unset;
# $SPECSERVE_SERVED_MODEL_NAME names it for clients.
# $SPECSERVE_SPECULATIVE_CONFIG (JSON) turns on speculative decoding for `serve` and `engine`.
# With $SPECSERVE_DRAFTER medusa or hydra, the heads are $SPECSERVE_HEADS_DIR, or the demo model's.
# $SPECSERVE_ENGINE_HEADLESS=1 runs a multi-node engine's worker (`vllm serve --headless`: no HTTP).
# Tool calling, as `specserve serve` chooses it (docs/tools.md): $SPECSERVE_TOOL_CALL_PARSER (unset:
# `specserve` on the demo model, none on another; `none`: off), $SPECSERVE_ENABLE_AUTO_TOOL_CHOICE
# (unset: on with a parser; 0/false/off/no: off), $SPECSERVE_TOOL_PARSER_PLUGIN (unset: specserve's),
# $SPECSERVE_CHAT_TEMPLATE. The plugin's other settings (SPECSERVE_JSON_MODE, ...) are read by the
# engine from its environment (docs/configuration.md).
# Secrets as files (compose secrets, mounted Secrets): $SPECSERVE_API_KEYS_FILE (one key a line) and
# $SPECSERVE_ENGINE_API_KEY_FILE fill $SPECSERVE_API_KEYS and $SPECSERVE_ENGINE_API_KEY when unset,
# so that no key appears in a command line or a compose file.
set -eu

if [ -z "${SPECSERVE_API_KEYS:-}" ] && [ -n "${SPECSERVE_API_KEYS_FILE:-}" ]; then
  SPECSERVE_API_KEYS=$(grep -v '^[[:space:]]*$' "$SPECSERVE_API_KEYS_FILE" | tr -d '\r' | paste -sd, -)
  export SPECSERVE_API_KEYS
fi
if [ -z "${SPECSERVE_ENGINE_API_KEY:-}" ] && [ -n "${SPECSERVE_ENGINE_API_KEY_FILE:-}" ]; then
  SPECSERVE_ENGINE_API_KEY=$(tr -d '\r\n' < "$SPECSERVE_ENGINE_API_KEY_FILE")
  export SPECSERVE_ENGINE_API_KEY
fi

mode="${1:-serve}"
[ "$#" -gt 0 ] && shift

host="${SPECSERVE_HOST:-0.0.0.0}"
case "$mode" in
  serve)
    if [ -n "${SPECSERVE_SPECULATIVE_CONFIG:-}" ]; then
      set -- --speculative-config "$SPECSERVE_SPECULATIVE_CONFIG" "$@"
    fi
    if [ -n "${SPECSERVE_SERVED_MODEL_NAME:-}" ]; then
      set -- --served-model-name "$SPECSERVE_SERVED_MODEL_NAME" "$@"
    fi
    if [ -n "${SPECSERVE_MODEL:-}" ]; then
      set -- --model "$SPECSERVE_MODEL" "$@"
    fi
    [ -n "${SPECSERVE_TOOL_CALL_PARSER:-}" ] && set -- --tool-call-parser "$SPECSERVE_TOOL_CALL_PARSER" "$@"
    case "${SPECSERVE_ENABLE_AUTO_TOOL_CHOICE:-}" in
      '') ;;
      0|false|off|no) set -- --no-enable-auto-tool-choice "$@" ;;
      *) set -- --enable-auto-tool-choice "$@" ;;
    esac
    [ -n "${SPECSERVE_TOOL_PARSER_PLUGIN:-}" ] && set -- --tool-parser-plugin "$SPECSERVE_TOOL_PARSER_PLUGIN" "$@"
    [ -n "${SPECSERVE_CHAT_TEMPLATE:-}" ] && set -- --chat-template "$SPECSERVE_CHAT_TEMPLATE" "$@"
    exec specserve serve --host "$host" --port "${SPECSERVE_PORT:-8000}" "$@"
    ;;
  engine)
    # The engine key ($SPECSERVE_ENGINE_API_KEY, or --engine-api-key-file PATH / $SPECSERVE_ENGINE_API_KEY_FILE)
    # is read by the middleware below: every route but /health and /metrics then needs it.
    # --engine-api-key-file is taken out of the arguments (vLLM does not know it).
    for arg in "$@"; do
      shift
      if [ "${want_key_file:-0}" = 1 ]; then
        SPECSERVE_ENGINE_API_KEY_FILE="$arg"; export SPECSERVE_ENGINE_API_KEY_FILE; want_key_file=0
        continue
      fi
      case "$arg" in
        --engine-api-key-file) want_key_file=1 ;;
        --engine-api-key-file=*)
          SPECSERVE_ENGINE_API_KEY_FILE="${arg#*=}"; export SPECSERVE_ENGINE_API_KEY_FILE ;;
        *) set -- "$@" "$arg" ;;
      esac
    done
    set -- --middleware specserve_vllm.engine_auth.EngineKeyMiddleware "$@"
    if [ -n "${SPECSERVE_SPECULATIVE_CONFIG:-}" ]; then
      # Per-request acceptance and drafts per step in each response: the gateway's goodput
      # policy learns from them, and they give the x-specserve-spec-k-mean/-max headers.
      set -- --speculative-config "$SPECSERVE_SPECULATIVE_CONFIG" \
        --per-request-spec-decode-metrics detailed "$@"
    fi
    # Unset SPECSERVE_MODEL: the demo model shipped in the package, named as `specserve serve` names it.
    if [ -n "${SPECSERVE_MODEL:-}" ]; then
      model="$SPECSERVE_MODEL"
      name="${SPECSERVE_SERVED_MODEL_NAME:-}"
    else
      model=$(specserve demo-model --print-path)
      name="${SPECSERVE_SERVED_MODEL_NAME:-specserve-demo}"
    fi
    if [ -n "$name" ]; then
      set -- --served-model-name "$name" "$@"
    fi
    # Tool flags as `specserve serve` gives them (specserve.commands.serve.tool_options).
    parser="${SPECSERVE_TOOL_CALL_PARSER:-}"
    if [ -z "$parser" ] && [ -z "${SPECSERVE_MODEL:-}" ]; then
      parser=specserve
    fi
    [ -n "${SPECSERVE_CHAT_TEMPLATE:-}" ] && set -- --chat-template "$SPECSERVE_CHAT_TEMPLATE" "$@"
    if [ -n "$parser" ] && [ "$parser" != none ]; then
      case "${SPECSERVE_ENABLE_AUTO_TOOL_CHOICE:-1}" in
        0|false|off|no) set -- --tool-call-parser "$parser" "$@" ;;
        *) set -- --tool-call-parser "$parser" --enable-auto-tool-choice "$@" ;;
      esac
      set -- --tool-parser-plugin "${SPECSERVE_TOOL_PARSER_PLUGIN:-specserve_vllm.compat.tool_parser}" "$@"
    elif [ -n "${SPECSERVE_TOOL_PARSER_PLUGIN:-}" ]; then
      set -- --tool-parser-plugin "$SPECSERVE_TOOL_PARSER_PLUGIN" "$@"
    fi
    case "${SPECSERVE_DRAFTER:-}" in
      medusa|hydra)
        if [ -z "${SPECSERVE_HEADS_DIR:-}" ]; then
          SPECSERVE_HEADS_DIR=$(specserve heads path --kind "$SPECSERVE_DRAFTER")
          export SPECSERVE_HEADS_DIR
        fi
        ;;
    esac
    if [ "${SPECSERVE_ENGINE_HEADLESS:-0}" = 1 ]; then
      exec vllm serve "$model" --headless "$@"
    fi
    exec python -m vllm.entrypoints.openai.api_server --model "$model" \
      --host "$host" --port "${SPECSERVE_ENGINE_PORT:-8100}" "$@"
    ;;
  gateway)
    exec specserve gateway --host "$host" --port "${SPECSERVE_PORT:-8000}" "$@"
    ;;
  *)
    exec "$mode" "$@"
    ;;
esac
