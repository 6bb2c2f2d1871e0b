"""Benchmarks: the study harness (:mod:`.study`), its simulated clock (:mod:`.clock`) and the sections they
write into BENCHMARKS.md (:mod:`.sections`). The entry points are in scripts/ (study.py, bench_*.py)."""
