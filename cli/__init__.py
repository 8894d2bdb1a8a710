"""The `raymoe` command line: argument parsing (main.py) and one module per command; the serving
itself lives in cluster/, the model in model/, the expert actors in actors/.

Torch, Ray, Serve, gRPC and the model code are imported inside the command functions that use them
(start-up time: `raymoe --help`, a bad flag and `raymoe generate` answer without loading them);
everything light is imported at the top of its module."""
