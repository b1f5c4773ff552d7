"""Native CPU kernels: C++ compiled once per machine and called through ctypes.

- build.py: compiles decode_kernels.cpp and matvec_kernels.cpp into one cached library, loads it.
- decode.py: the one-token decode kernels (norm, rotary + cache, attention, SiLU) for the fused step.
- matvec.py: Q4_0 / Q8_0 weights times a few activation rows (int8 dot products), for decode.
"""
