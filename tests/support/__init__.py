"""Test plumbing shared by the test modules (no tests here); fixtures are in tests/conftest.py.

``peers`` finds the real peer programs, ``paths`` names the repository's files, ``net``
gives free loopback ports and a UDP sink, ``processes`` the one child-process wrapper and
the one ``wait_for``, ``brokers`` a real mosquitto, ``sip`` SIPp and the responder,
``system`` every piece as its own process, ``monitor`` signed results and configs,
``mqtt`` the publisher helpers, ``hostile`` signed nonsense, ``numbers`` every region's
emergency numbers, ``browser`` headless Chromium.
"""
