"""The scaling study: objectives x tokenizer compute, each cell made by the ordinary commands
(cells.py), run resumably and in parallel (runner.py), tabulated (results.py) and plotted
(figures.py). `python -m vtp_jax.study --config=configs/study/shapes_cpu.py --workdir=DIR`."""
