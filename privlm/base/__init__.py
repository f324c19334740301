"""The ground floor: config, errors, the gRPC server kit, transport and certificates, telemetry.

Imports nothing else of the project (tests/test_layering.py)."""
