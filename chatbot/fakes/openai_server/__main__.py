"""``python -m chatbot.fakes.openai_server``: the fake's command line (:func:`._app.main`).

Run by ``chatbot.cluster``, docker-compose's ``fake-openai`` service and the tests.
"""

import sys

from ._app import main

if __name__ == "__main__":
    sys.exit(main())
