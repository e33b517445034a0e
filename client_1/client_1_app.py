"""Client 1: private data on y=2x+1 (data.csv beside this file), port 5001.

Run: cd client_1 && poetry install && poetry run python client_1_app.py
"""
from pathlib import Path

from fedavg.http.client_app import main

if __name__ == "__main__":
    main(client_id="client_1", port=5001, data_path=Path(__file__).with_name("data.csv"))
