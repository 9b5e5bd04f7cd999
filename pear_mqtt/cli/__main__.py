"""``python -m pear_mqtt.cli``: the same as the ``pear-mqtt`` console script."""

from .main import main

raise SystemExit(main())
