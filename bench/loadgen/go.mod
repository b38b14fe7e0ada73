module bumper.bench/loadgen

go 1.19
