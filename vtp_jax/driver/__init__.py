"""The training program: the driver that runs a task (loop.py) and its command line's flags
(command_line.py); launch/main.py is a shell over them. It stands above everything it drives."""
