"""The certificate authority: KEK-sealed root and JWT keys, per-process signing CAs."""
