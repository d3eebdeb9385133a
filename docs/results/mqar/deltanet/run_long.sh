/usr/bin/time -f "long wall %e s" -a -o runs/mqar3/wall.txt \
nice -n 10 .venv/bin/celldsl compare mqar cells/deltanet.cell \
    --state-size 512 --width 32 --layers 2 -o vocab=64 -o pairs=4 -o T=64 --steps 12000 --batch 64 \
    --lr 3e-3 --eval-every 1000 --threads 1 --quiet --out runs/mqar3/state512-long > runs/mqar3/long.log 2>&1
