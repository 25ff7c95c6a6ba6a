"""Memory tiers (gpu, cpu, disk) with byte budgets: `pools` (`Tier`, `TierBudgets`, pools and disk
files), `tiers` (`Memory` and the one counted `copy`), `copy_engine` (background copy threads, the
emulated link), `cuda_copy` (CUDA side streams).

May import: `runner.spec`, `runner.units`. Nothing else of the project.
"""
