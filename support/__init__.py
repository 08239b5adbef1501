"""What stack/, loadtests/ and tests/ share to run servers: processes, ports, waiting, Triton metrics, seeds.

Each module imports only what it needs; none imports pytest except `support.assertions` (tests only).
"""
