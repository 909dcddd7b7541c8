"""Probe side: the agent, the SIP engine (the only pjsua2 user), the responder, the guard."""
