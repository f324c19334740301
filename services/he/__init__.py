"""Homomorphic-encryption preprocessing service (TenSEAL CKKS): scores and aggregates bank data that
stays encrypted under the bank's own key. See docs/he.md."""
