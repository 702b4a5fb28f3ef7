import java.util.ArrayList;
import java.util.List;

/** Fills a ZGC heap with 160 MiB it holds, collects it four times, waits
 *  argv[0] ms, and exits:
 *  ZGC maps its heap (a memfd) at three addresses, once per pointer colour. */
public class ZHeap {
    public static void main(String[] args) throws Exception {
        List<byte[]> kept = new ArrayList<>();
        for (int i = 0; i < 160; i++) {
            byte[] block = new byte[1 << 20];
            for (int at = 0; at < block.length; at += 4096) block[at] = 1;
            kept.add(block);
        }
        // Each cycle flips the pointer colour: the objects are reached,
        // and their pages mapped, through the other views too.
        for (int cycle = 0; cycle < 4; cycle++) {
            System.gc();
            for (byte[] block : kept)
                for (int at = 0; at < block.length; at += 4096) block[at]++;
        }
        Thread.sleep(args.length > 0 ? Integer.parseInt(args[0]) : 1000);
        System.out.println(kept.size());
    }
}
