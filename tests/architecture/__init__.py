"""The project's shape: import layers, no tower name outside towers/, generated docs current."""
