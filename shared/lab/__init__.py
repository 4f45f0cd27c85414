"""The lab: the demo, the process harness that runs a real federation on loopback, and their fixtures (tiny models
of the real architectures, built-in domains). Used by ``dume demo``, the benchmarks and the tests; the library
(``dume.shared`` outside this package), the coordinator and the node never import it."""
