"""Raw FedAvg: the pieces every app shares.

- ``model``: the linear model y = w·x + b, its MSE and gradient (pure NumPy).
- ``training``: local gradient descent on one client's data.
- ``aggregation``: the FedAvg weighted average and the trace that writes it out.
- ``wire``: the JSON wire format, parsed and validated.
- ``data``: a client's private CSV, loaded and validated.
- ``client``: the Flask app factory every client runs.
"""
