"""Pipeline stages. Each reads its inputs from the run manifest and records its outputs there."""
