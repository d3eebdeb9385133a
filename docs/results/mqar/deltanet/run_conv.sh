/usr/bin/time -f "conv wall %e s" -a -o runs/mqar3/wall.txt \
nice -n 10 .venv/bin/celldsl compare mqar runs/mqar3/cells/deltanet_conv.cell \
    --state-size 256 --width 32 --layers 2 -o vocab=64 -o pairs=4 -o T=64 --steps 3000 --batch 64 \
    --lr 3e-3 --eval-every 500 --threads 1 --quiet --out runs/mqar3/deltanet_conv256 > runs/mqar3/conv.log 2>&1
