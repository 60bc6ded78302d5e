"""The test harness: the fleet simulator and the demo, which drive both sides of the system.

The harness may import ``agent``, ``cloud``, ``edgemqtt`` and ``modules``; nothing imports the
harness but the command-line glue that registers ``edgectl simulate`` and ``edgectl demo``
(``cloud/cli.py``). ``tests/unit/test_import_layers.py`` holds every package to that.
"""
