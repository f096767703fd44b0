"""A fake OpenAI API that stands in for the real one offline and referees the demos.

It answers what the SDKs call, in the real API's shapes (the real ``openai`` SDK parses
every answer): ``POST /v1/chat/completions`` (streaming too, with a final usage chunk when
``stream_options.include_usage`` is set, and tool calls), ``POST /v1/responses`` (the Agents
SDK's default, streaming too), ``POST /v1/embeddings`` and ``GET /v1/models``, behind bearer
auth (401 ``invalid_api_key``).

It enforces its own limits like the real API, globally or per API key: requests in flight,
requests and tokens per rolling window (exact sliding logs, ``window_seconds`` long, 60 by
default), and a quota of total requests. ``model_limits`` adds each model's own requests
and tokens per window (per key and model with scope "key", per model across keys with
scope "global"), and ``key_limits`` gives single keys limits of their own (a tier); a
request must fit every bucket it falls in. A request is charged tokens when it arrives, as
the larger of its output cap and an estimate of its input, and corrected to its real usage
when its response has been sent. Excess answers 429 with the real body and ``retry-after``,
``retry-after-ms`` and ``x-ratelimit-*`` headers (those of its model's limits when it has
some, as the real API's).

It is the referee: it imports nothing of ``limiter`` or of the rest of ``chatbot``. With its
own clock (``time.monotonic``) it records every admitted request (a 429 is a rejection, never
an admission), the most requests it ever had in flight (a response is in flight until its
last byte, the last chunk of a stream included, has been sent), the most requests and tokens
admitted in any rolling window, the 429s by reason and the 401s. ``GET /admin/record`` serves
that record, ``POST /admin/reset`` clears it, ``GET``/``POST /admin/config`` read and change
the limits at runtime.

Run it::

    python -m chatbot.fakes.openai_server --port 8011 --max-in-flight 5 --rpm 60 \\
        --tpm 100000 --latency 0.2 --api-key sk-fake-openai --model-limit gpt-4o=30:20000

The package, one module per job (none imports from ``limiter`` or the rest of ``chatbot``):
``_config`` (the configuration and its runtime changes), ``_limits`` (the buckets per key
and per model, admission, the 401 and 429 answers), ``_record`` (the referee's record),
``_model`` (the scripted answers and tool calls), ``_chat`` (``/v1/chat/completions``),
``_responses`` (``/v1/responses``), ``_app`` (``create_app``, embeddings, models, admin, the
command line) and ``_wire`` (error bodies, ids, SSE lines, responses that hold their slot).
"""

from .._common import max_in_window
from ._app import create_app, main
from ._config import DEFAULT_API_KEY, FakeOpenAIConfig, go_duration, mask_key
from ._limits import FakeOpenAI
from ._model import embed

__all__ = [
    "DEFAULT_API_KEY",
    "FakeOpenAI",
    "FakeOpenAIConfig",
    "create_app",
    "embed",
    "go_duration",
    "main",
    "mask_key",
    "max_in_window",
]
