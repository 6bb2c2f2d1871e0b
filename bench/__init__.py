"""Benchmarks and their harnesses, outside the agent and the coordinator: the study (:mod:`.study`), its simulated
clock (:mod:`.clock`), the regimes (:mod:`.regimes`) and fault scenarios (:mod:`.scenario`), a fleet of agents in
one process for load tests (:mod:`.fleet`), emulated device speeds (:mod:`.emulation`), the headless browser of the
dashboard benchmark (:mod:`.browser`) and the sections they write into BENCHMARKS.md (:mod:`.sections`). The entry
points are in scripts/ (study.py, regimes.py, bench_*.py); install with the ``bench`` extra."""
