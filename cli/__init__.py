"""The `raymoe` command line: argument parsing (main.py) and one module per command; the serving
itself lives in cluster/, the model in model/, the expert actors in actors/."""
