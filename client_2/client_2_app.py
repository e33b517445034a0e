"""Client 2: private data on y=x+1 (data.csv beside this file), port 5002.

Run: cd client_2 && poetry install && poetry run python client_2_app.py
"""
from pathlib import Path

try:
    from fedavg.http.client_app import main
except ModuleNotFoundError as e:  # a python without the app's Poetry environment: say how to run it
    raise SystemExit(f"error: no module {e.name}; run: {__doc__.split('Run: ')[1].splitlines()[0]}") from None

if __name__ == "__main__":
    main(client_id="client_2", port=5002, data_path=Path(__file__).with_name("data.csv"))
