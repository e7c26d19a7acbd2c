"""Speed and memory comparisons, each case measured in a fresh process. Not tests: results are committed
under benchmarks/results/ with the command that regenerates them."""
