"""Shared code of the test suite: no tests here, only what several test modules use.

Test modules import these as ``from helpers.tiny_models import make_model`` (pytest puts
``tests/`` on ``sys.path``, through the rootdir ``conftest.py``):

- ``tiny_models``: tiny random causal LMs of every supported family, built from configs.
- ``tiny_example``: a tiny GPT-2 trained on TINY_CORPUS, with queries and themed records.
- ``engines``: the small worlds that several engine test modules share (a float32 Llama and
  a float64 GPT-2, their texts and queries) and their helpers.
- ``store_worlds``: models, factors and gradient stores for the store scoring, codec and
  reader tests, with their tolerance helpers and the autograd reference of weight gradients.
- ``browser_pages``: Debian's chromium under Playwright, and a page opener that records
  console messages, page errors and requests.
- ``live``: notebooks served by Voilà on 127.0.0.1, for widget tests in a real browser.
- ``store_child`` and ``dist_store_child``: scripts run in other processes (by path) that
  build gradient stores, for the fault-injection and ``torchrun`` tests; ``store_child``'s
  ``make_inputs`` is also imported by those tests to build identical reference stores.
"""
