"""Writes the benchmark config: N OAuth accounts on one provider (the mock's token URL),
behind the Basic credentials the load scripts send.

    python3 benches/accounts.py OUT.json N TOKEN_URL
"""
import json
import sys

path, n, url = sys.argv[1], int(sys.argv[2]), sys.argv[3]
cfg = {
    "auth": {"username": "emailengine", "password": "load-test-password"},
    "providers": {"idp": {"type": "oauth2", "tokenUrl": url, "clientId": "c", "clientSecret": "s"}},
    "accounts": {
        f"acct-{i}": {"user": f"user{i}@example.com", "provider": "idp", "refreshToken": f"rt-{i}"}
        for i in range(n)
    },
}
with open(path, "w") as f:
    json.dump(cfg, f)
