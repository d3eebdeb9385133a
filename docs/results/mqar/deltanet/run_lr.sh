for LR in 1e-3 1e-2; do
  /usr/bin/time -f "lr$LR wall %e s" -a -o runs/mqar3/wall.txt \
  nice -n 10 .venv/bin/celldsl compare mqar cells/deltanet.cell \
    --state-size 256 --width 32 --layers 2 -o vocab=64 -o pairs=4 -o T=64 --steps 3000 --batch 64 \
    --lr $LR --eval-every 500 --threads 1 --quiet --out runs/mqar3/deltanet256-lr$LR > runs/mqar3/lr$LR.log 2>&1
done
